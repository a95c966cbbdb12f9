"""The tuner: ``python -m bench.tune`` runs the planner's fastest predictions and reports predicted vs measured."""
