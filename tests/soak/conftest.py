"""The soak runs on the fault suite's stack (tests/faults/conftest.py), in a folder of its own so
that `pytest tests/faults` and the default run never start its ten minutes."""

from tests.faults.conftest import figures, healthy, stack  # noqa: F401  (fixtures)
