"""Split names shared by the data, the traces and the agents."""

TRAIN, DEV = "train", "dev"
# Examples held out of backbone fine-tuning (``data.policy_split`` > 0): calibration and, by default, learned
# policies use them, since the backbone never saw them. The name "policy" is what data and trace files store.
HELD_OUT = "policy"
