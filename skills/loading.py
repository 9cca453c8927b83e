"""One model load at a time, process-wide.

transformers' ``from_pretrained`` is not safe in two threads at once: while one model loads it
swaps torch's weight initialisers and default device process-wide, and a model loading in another
thread can come out with weights left on the meta device ("Cannot copy out of meta tensor").
Every worker that loads a transformers model holds this lock while it does, and while it first
imports transformers' lazily resolved classes (two threads resolving them at once can fail with
"cannot import name ...").
"""

from __future__ import annotations

import threading

MODEL_LOAD_LOCK = threading.Lock()
