"""One training process under torchrun, for tests/test_train_distributed.py.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train_process.py \
        CONFIG.json [--kill-rank R --kill-at-step S]

Trains with the TrainConfig in CONFIG.json. With --kill-rank, process R sends itself SIGKILL when
it starts its S-th optimizer step (counted from 1 in this run): a crash mid-epoch, which the
launcher turns into the whole job failing.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the py: reward of the test data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-at-step", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    from value_models.training import trainer
    from value_models.training.train_config import TrainConfig

    if args.kill_rank is not None and int(os.environ["RANK"]) == args.kill_rank:
        real, calls = trainer.optimizer_step, [0]

        def dying_step(*a, **kw):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == args.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)

        trainer.optimizer_step = dying_step
    trainer.train_value_model(TrainConfig.model_validate_json(args.config.read_text()))


if __name__ == "__main__":
    main()
