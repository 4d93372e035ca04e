"""`vl3 batch --engine ray`: the batch's items answered on a Ray cluster with Ray Data.

The driver (cli.py's `batch`) does what it does for the local engine -- inputs, shards, the resume
plan, the output file, Ctrl-C, progress and summary -- and takes its Results from
`RayEngine.results` instead of `Model.run`. This module is a thin caller of the Python API: every
answer comes from `Model.run` inside an actor (api.py), every file is read by `prepare_visual`.

One Ray Data dataset per run:

    the todo items (inputs.Entry: media, prompt, id): their media made absolute
      -> map_batches(_read): CPU tasks, one item each: `Runner`'s media reading (every medium of
         the item, `prepare_visual`) -> (visuals, seconds), or the error reading raised, as a
         Python object Ray carries to the actors
      -> map_batches(_Answerer): a pool of `--actors` actors with `--gpus-per-actor` GPUs each;
         each loads the model once (`vl3cli.load`) and answers 2 x `--batch-size` items per call
         with `Model.run` (continuous batching: as answers end, the call's other items take their
         rows), yielding each record as it is done
      -> rows (index, record as JSON) streamed back to the driver as they finish

Resolved once on the driver, so that bad options fail before Ray starts: the model (config and
budget checked; a Hub id is downloaded there), its processor config and the media options.
Actors load a local folder by its absolute path and a Hub id by name (records name the model as
the user did), and read media by absolute path: on a multi-node cluster the checkpoint folder and
the media must be on a shared filesystem at the same path, or the model a Hub id every node can
download.

Failures: a file that cannot be read is an error record, as in the local engine; a run that fails
inside an actor (e.g. out of GPU memory) gives error records for its unanswered items; a block
Ray gives up on (a worker that died) is dropped, and its items get error records at the end, so
every item gets one record. Ctrl-C: the driver only waits for records, so the first signal
interrupts at once (`StopSignal.waiting`); the dataset's execution stops, and a Ray this process
started is shut down. Ray's logs stay in its session folder (`/tmp/ray/session_latest/logs`)
unless `--debug`.

Ray is an optional extra (`pip install 'vl3cli[ray]'`), imported only here, only for `--engine ray`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .batch import StopSignal
from .errors import UsageError, Vl3Error
from .fetch import is_url
from .inputs import Entry
from .options import Options
from .output import Result, error_message, to_json

READ_CPUS = 1.0  # a reading task decodes one file
# An actor's CPUs besides its GPUs: its Python loop. (Actors without GPUs compute on one torch
# thread, as Ray sets OMP_NUM_THREADS from this; the Ray engine is meant for GPUs.)
ACTOR_CPUS = 0.5
BATCH_FACTOR = 2  # items per actor call, in units of --batch-size
# Ray Data settings for the run: one block per record (so records stream back as they finish);
# a failed block dropped rather than the run ended (its items get error records); no progress bars.
DATA_CONTEXT = {"target_max_block_size": 1, "max_errored_blocks": -1, "enable_progress_bars": False}
ANSWERED = "nothing left"  # a part standing for an item whose segments are all answered already (resume)
LOST = "lost on the Ray cluster (a worker died before answering; see Ray's logs); redo it with --retry-failed"


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start or join a local Ray
    actors: int = 1
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs and --device is not cpu, else 0
    batch_size: int = 8
    debug: bool = False

    def __post_init__(self):
        if self.actors < 1:
            raise UsageError(f"--actors must be at least 1 (got {self.actors})")
        if self.gpus_per_actor is not None and not (math.isfinite(self.gpus_per_actor) and self.gpus_per_actor >= 0):
            raise UsageError(f"--gpus-per-actor must be 0 or more (got {self.gpus_per_actor:g})")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {self.batch_size})")


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise Vl3Error("--engine ray needs Ray: pip install 'vl3cli[ray]'") from None
    return ray


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class RayEngine:
    """A connection to Ray and a model resolved for it (a context manager: leaving it disconnects,
    and stops the local Ray this process started). `results()` runs one dataset."""

    def __init__(self, ray, load: dict, options: Options, processor, media, gpus: float, settings: RaySettings, owned: bool):
        self.ray, self.load, self.options, self.processor, self.media = ray, load, options, processor, media
        self.gpus, self.settings, self.owned = gpus, settings, owned
        self._runs: weakref.WeakSet = weakref.WeakSet()  # the `results()` generators not finished yet

    @classmethod
    def start(cls, model: str, revision: str | None, device: str, dtype: str, quantize: str | None,
              options: Options, settings: RaySettings) -> RayEngine:  # fmt: skip
        from .api import check_budget
        from .config import ModelConfig
        from .hub import model_label, resolve_model
        from .pipeline import visual_token_budget
        from .preprocess import ProcessorConfig

        ray = _import_ray()
        configs: list[ModelConfig] = []

        def checked(folder: Path) -> None:
            configs.append(ModelConfig.from_dir(folder))
            check_budget(configs[0], options)

        folder = resolve_model(model, revision, on_config=checked)
        processor = ProcessorConfig.from_dir(folder, patch_size=configs[0].vision.patch_size)
        # the readers refuse a video that cannot fit from its plan, before decoding it, as the local engine does
        media = replace(options.media(processor), token_budget=visual_token_budget(configs[0], options))
        local = Path(model).expanduser().is_dir()
        load = {
            "model": str(folder.resolve()) if local else model, "revision": None if local else revision,
            "name": model_label(model, revision), "device": device, "dtype": dtype, "quantize": quantize,
        }  # fmt: skip
        owned = _connect(ray, settings)
        try:
            gpus = _check_resources(ray, settings, device)
        except BaseException:
            if owned:
                ray.shutdown()
            raise
        return cls(ray, load, options, processor, media, gpus, settings, owned)

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc) -> None:
        # A caller that stopped reading early (a broken pipe, a full disk: its traceback still holds
        # the generator) has its run ended here, its actors released: closed later, after the
        # shutdown, the run's clean-up would call into Ray and start a new local Ray.
        for run in list(self._runs):
            run.close()
        if self.owned:
            self.ray.shutdown()

    def results(self, todo: list[tuple[Entry, frozenset]], stop: StopSignal) -> Iterator[Result]:
        """One Result per entry of `todo` (one per segment when segmenting; the frozenset: segments
        already answered), in the order they finish (the local engine's records). Leaving the
        engine ends a run not read to its end."""
        run = self._results(todo, stop)
        self._runs.add(run)
        return run

    def _results(self, todo: list[tuple[Entry, frozenset]], stop: StopSignal) -> Iterator[Result]:
        ray = self.ray
        rows = [{"index": i, "entry": entry, "skip": skip} for i, (entry, skip) in enumerate(todo)]
        pending = {i: entry for i, (entry, _) in enumerate(todo)}
        seen: set[tuple] = set()  # (index, segment): a retried task may repeat a record; keep the first
        used = {"dtype": None, "device": None}  # what the actors ran on, for the records of lost items
        with self._quiet_data_context():
            ds = ray.data.from_items(rows).map_batches(
                _read, batch_size=1, batch_format="numpy", num_cpus=READ_CPUS,
                fn_kwargs={"processor": self.processor, "media": self.media, "options": self.options},
            ).map_batches(
                _Answerer, batch_size=BATCH_FACTOR * self.settings.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=self.settings.actors), num_cpus=ACTOR_CPUS, num_gpus=self.gpus,
                fn_constructor_kwargs={"load": self.load, "options": self.options, "batch_size": self.settings.batch_size},
            )  # fmt: skip
            for row in _rows(ds, stop):
                if not row["record"]:  # its segments were all answered by an earlier run
                    pending.pop(int(row["index"]), None)
                    continue
                record = json.loads(row["record"])
                if (mark := (int(row["index"]), record.get("segment_start"))) not in seen:
                    seen.add(mark)
                    pending.pop(mark[0], None)
                    used = {k: record.get(k) or used[k] for k in used}
                    yield Result.from_dict(record)
        for entry in pending.values():
            yield Result(
                id=entry.id, path=entry.media[0] if len(entry.media) == 1 else None, media=list(entry.media),
                prompt=entry.prompt, system=self.options.system, model=self.load["name"], quantize=self.load["quantize"],
                options=self.options.record(entry.prompt), error=LOST, **used,
            )  # fmt: skip

    @contextmanager
    def _quiet_data_context(self) -> Iterator[None]:
        """Ray Data's settings for this run (DATA_CONTEXT), and its logs off the terminal unless debugging."""
        context = self.ray.data.DataContext.get_current()
        loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]  # "ray": e.g. its Arrow conversion warnings
        settings = DATA_CONTEXT | ({"enable_progress_bars": True} if self.settings.debug else {})
        saved = {name: getattr(context, name) for name in settings}, [logger.level for logger in loggers]
        for name, value in settings.items():
            setattr(context, name, value)
        if not self.settings.debug:
            for logger in loggers:
                logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, value in saved[0].items():
                setattr(context, name, value)
            for logger, level in zip(loggers, saved[1]):
                logger.setLevel(level)


def _connect(ray, settings: RaySettings) -> bool:
    """Join `--ray-address`, or start or join a local Ray; True when this process made the connection
    (a caller already connected keeps its own)."""
    if ray.is_initialized():
        return False
    quiet = {} if settings.debug else {"log_to_driver": False, "logging_level": logging.ERROR}
    try:
        ray.init(address=settings.address, **quiet)
    except Exception as e:  # noqa: BLE001 -- Ray raises ConnectionError, ValueError, RuntimeError, ... here
        where = f" at {settings.address}" if settings.address else ""
        raise Vl3Error(f"cannot start or join Ray{where}: {_first_line(e)}") from e
    return True


def _check_resources(ray, settings: RaySettings, device: str) -> float:
    """GPUs per actor (the default rule applied), once the cluster is known to hold the pool:
    an actor pool Ray cannot place would wait forever."""
    total = ray.cluster_resources()
    have_gpus, have_cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    gpus = settings.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if have_gpus > 0 and device != "cpu" else 0.0
    need_gpus, need_cpus = settings.actors * gpus, settings.actors * ACTOR_CPUS + READ_CPUS
    if need_gpus > have_gpus or need_cpus > have_cpus:
        raise UsageError(
            f"--actors {settings.actors} with {gpus:g} GPU(s) each need {need_gpus:g} GPUs and {need_cpus:g} CPUs "
            f"(with one reading task); the Ray cluster has {have_gpus:g} GPUs and {have_cpus:g} CPUs: "
            "lower --actors or --gpus-per-actor, or add nodes"
        )
    return gpus


def _rows(ds, stop: StopSignal) -> Iterator[dict]:
    """The dataset's rows as they come; a signal while waiting stops at once, and the execution ends with the loop."""
    stream = iter(ds.iter_rows())
    try:
        while True:
            try:
                with stop.waiting():
                    row = next(stream, None)
            except Exception as e:  # noqa: BLE001 -- Ray wraps what failed (actors that cannot load, a lost cluster)
                raise Vl3Error(f"the Ray run failed: {_first_line(e)}") from e
            if row is None:
                return
            yield row
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stops the dataset's execution: its tasks and actors end


# -- what runs on the cluster -------------------------------------------------------------------


def _absolute(path: str) -> str:
    """A path every node reads alike (URLs as they are)."""
    return path if is_url(path) else os.path.abspath(path)


def _read(batch, processor, media, options: Options):
    """CPU task, a generator: each item's media read -> one output row per part, (visuals,
    seconds), yielded as soon as it is read: a long video cut into segments gives its windows one
    at a time (the task never holds more than one window's frames, and those read before a failure
    are kept); ANSWERED when its segments were all answered before; or the error reading raised,
    made portable (a vl3 error naming the files as the user spelled them)."""
    import numpy as np

    from .pipeline import Item, read_parts

    def row(index, entry: Entry, part) -> dict:
        return {"index": np.array([index], dtype=np.int64), "entry": _objects([entry]), "prepared": _objects([part])}

    for i, entry, skip in zip(batch["index"], batch["entry"], batch["skip"]):
        if entry.error is not None:
            yield row(i, entry, UsageError(entry.error))
            continue
        item = Item(tuple(_absolute(m) for m in entry.media), (entry.prompt,), skip=skip)
        parts = 0
        try:
            for part in read_parts(item, processor, media, options):
                parts += 1
                yield row(i, entry, _spelled(part, entry))
        except Exception as e:  # noqa: BLE001 -- a file that cannot be read is its item's error record
            message = error_message(e)
            for m in entry.media:
                message = message.replace(_absolute(m), m)
            parts += 1
            yield row(i, entry, type(e)(message) if isinstance(e, Vl3Error) else Vl3Error(message))
        if not parts:
            yield row(i, entry, ANSWERED)


def _spelled(part, entry: Entry):
    """A part read from absolute paths, its visuals naming the files as the user spelled them."""
    visuals, seconds = part
    names = {_absolute(m): m for m in entry.media}
    return tuple(replace(v, path=names.get(v.path, v.path)) for v in visuals), seconds


def _objects(values: list):
    """One Python object per row, whatever its shape (numpy would unpack tuples)."""
    import numpy as np

    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


class _Answerer:
    """Actor: one model, loaded once, answering batches of items whose media is already read."""

    def __init__(self, load: dict, options: Options, batch_size: int):
        from .api import load as load_model
        from .heap import keep_freed_memory

        self.model = load_model(**load, **asdict(options))
        keep_freed_memory()  # the actor's process is vl3's, as the command's is
        self.batch_size = batch_size

    def __call__(self, batch):
        import numpy as np

        from .pipeline import Item

        items, left = [], {}  # left: item number in this call -> index in the run
        for index, entry, part in zip(batch["index"], batch["entry"], batch["prepared"]):
            if isinstance(part, str) and part == ANSWERED:
                yield {"index": np.array([int(index)], dtype=np.int64), "record": np.array([""], dtype=object)}
                continue
            left[len(items)] = int(index)
            items.append(Item(entry.media, (entry.prompt,), entry.id, prepared=part))
        try:
            for (n, _), result in self.model.run(items, batch_size=self.batch_size, workers=1):
                yield _record_row(left.pop(n), result)
        except Exception as e:  # noqa: BLE001 -- the call failed as a whole (e.g. out of GPU memory)
            error = Vl3Error(error_message(e))
            for n, index in left.items():  # its unanswered items become error records, as the local engine's
                for _, result in self.model.run([replace(items[n], prepared=error)]):
                    yield _record_row(index, result)


def _record_row(index: int, result: Result) -> dict:
    import numpy as np

    return {"index": np.array([index], dtype=np.int64), "record": np.array([to_json(result)], dtype=object)}
