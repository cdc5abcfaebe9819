"""The metric contract: one walk of a policy up the layers, its metrics, trade-off curves and the honest
comparison protocol (choices on validation, paired bootstrap CIs)."""
