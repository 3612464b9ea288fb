"""The experiment layer: what ``offprincipal train/evaluate/analyze/demo`` and the benchmarks run.

- :mod:`.methods`: the only list of training methods (:data:`~.methods.METHODS`) and how each is built;
- :mod:`.records`: the typed run record (``summary.json``) and its reader;
- :mod:`.checkpoints`: models, adapters and run folders as the command line names them;
- :mod:`.evaluation`: held-out accuracy with intervals, and retention;
- :mod:`.callbacks`: the Trainer callbacks of a run;
- :mod:`.runner`: the commands themselves.

Tasks (built-in, JSONL, the retention task) are in :mod:`offprincipal.experiment.tasks`, the embedded model in
:mod:`offprincipal.experiment.models`, the retention figures in :mod:`offprincipal.experiment.retention`.
"""

from .errors import UsageError
from .methods import METHODS, Method, get_method
from .records import RunFacts, read_summary, write_summary

__all__ = ["METHODS", "Method", "RunFacts", "UsageError", "get_method", "read_summary", "write_summary"]
