"""A stand-in for a model SDK, so the guide's examples run without a key or a network.

``complete`` answers with what hale reads from a model SDK's response (the ``model``, and
``usage`` with ``input_tokens`` and ``output_tokens``, as Anthropic's SDK names them) and
the ``text``: the same answer for the same prompt, after blocking its thread for
``latency`` seconds as a synchronous SDK does.
"""

import hashlib
import time
from typing import Any, Dict


def complete(prompt: str, model: str = "fake-llm-1", latency: float = 0.0) -> Dict[str, Any]:
    time.sleep(latency)
    digest = hashlib.sha256(f"{model}|{prompt}".encode()).hexdigest()
    return {
        "model": model,
        "text": f"[{digest[:8]}] {prompt[:60]}",
        "usage": {"input_tokens": len(prompt.split()), "output_tokens": 20},
    }
