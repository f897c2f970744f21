"""Reading finished runs and reporting on them: collect (run folders), tables, stats, plotting (torch-free)."""
