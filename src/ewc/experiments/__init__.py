"""Experiments: each builds data + model + method, runs, and hands its results to the report."""
