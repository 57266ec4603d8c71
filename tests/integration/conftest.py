"""Integration tier: the real emulators and functions-framework processes.

The ``local_stack`` fixture comes from ``tests/support/stack_plugin.py`` (loaded by the
root conftest) so the e2e tier shares the same session stack.
"""
