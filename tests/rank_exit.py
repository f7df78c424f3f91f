"""Run ``dino_train/main.py`` exactly as torchrun would, and record how it ended in
``$RANK_EXIT_DIR/rank<RANK>``: torchrun does not report its workers' exit statuses after it was itself
signalled, and test_stop_signals needs to know that every rank exited 0."""

import os
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # not tests/ on the path
    script = here.parent / "dino_train" / "main.py"
    record = Path(os.environ["RANK_EXIT_DIR"]) / f"rank{os.environ.get('RANK', '0')}"
    sys.argv = [str(script), *sys.argv[1:]]
    status = "no exit status"
    try:
        runpy.run_path(str(script), run_name="__main__")
        status = "0"
    except SystemExit as exc:
        status = str(exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1))
        raise
    except BaseException as exc:
        status = f"raised {type(exc).__name__}"
        raise
    finally:
        record.write_text(status)
