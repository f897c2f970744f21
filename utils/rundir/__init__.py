"""A run folder: its identity and name, its record/lock/state, its resumable checkpoint and its log.
(``identity``, ``record``: torch-free; ``checkpoint``: torch.)"""
