"""``python -m tests.slow_eval_cliplab ARGS`` (or ``torchrun -m tests.slow_eval_cliplab``) runs
``cliplab ARGS`` with each pretraining evaluation first sleeping ``CLIPLAB_TEST_EVAL_SLEEP_S``
seconds: an evaluation longer than a rank timeout on any machine, however fast, without making
the timeout so short that a loaded machine's start-up skew between ranks outlasts it."""

from __future__ import annotations

import os
import sys
import time

import cliplab.train.pretrain as pretrain
from cliplab.cli import main

_run_suite = pretrain.run_suite


def _slow_run_suite(*args, **kwargs):
    time.sleep(float(os.environ["CLIPLAB_TEST_EVAL_SLEEP_S"]))
    return _run_suite(*args, **kwargs)


pretrain.run_suite = _slow_run_suite
sys.exit(main())
