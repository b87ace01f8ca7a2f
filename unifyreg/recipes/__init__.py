"""Recipes: readable end-to-end jobs, each ``run(config) -> exit code``.

The command line (``unifyreg <command>``) and the thin scripts in the repository's
``recipes/`` folder both call these.
"""
