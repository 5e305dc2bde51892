"""The method: schedule, network, loss, solvers, model format, training and evaluation.

Imports neither web nor queue code, so training and tests can use it alone.
"""
