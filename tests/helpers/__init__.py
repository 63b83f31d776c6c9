"""Test factories shared by all test packages (importable as ``helpers``: see pyproject)."""
