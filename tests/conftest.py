"""Tests run tiny models: one intra-op thread is faster for them than two, and immune to a busy machine
(two OpenMP threads spinning against another process can be ten times slower).

Runs share reference log-probs through a cache folder (train.py --reference-cache, by default under
$XDG_CACHE_HOME): the tests get a fresh one of their own, never the home folder's."""
import os
import tempfile

import torch

torch.set_num_threads(1)
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="prlhf-tests-cache-")
