"""do_acnet.py's modes: the table of modes, the command line, and each mode's runner (torch-free to import)."""
