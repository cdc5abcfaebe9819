"""Real early exits on new text: `EarlyExitClassifier` and the GPU fast path of the walk."""

from exitrl.runtime.classifier import EarlyExitClassifier

__all__ = ["EarlyExitClassifier"]
