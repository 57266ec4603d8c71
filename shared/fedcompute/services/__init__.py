"""Service logic behind each Cloud Function: typed requests in, typed results out.

Services take their dependencies (stores, blob stores, publishers, clocks, random
sources) as arguments; the functions' ``main.py`` files parse HTTP/CloudEvent input,
call them, and map :mod:`fedcompute.errors` to status codes.
"""
