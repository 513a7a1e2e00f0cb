"""The parts of bench/operator_scale.py: processes, Job watching, request accounting, environment."""
