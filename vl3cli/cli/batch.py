"""`vl3 batch`: many files (or a manifest's items) into a resumable JSONL or Parquet file,
answered in this process or on a Ray cluster (`--engine ray`)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Annotated, Literal

import typer

from ..errors import EMPTY_QUESTION, UsageError
from ..hub import model_label
from .app import (
    LOAD_KEYS,
    OUTPUT,
    RAY,
    _env_debug,
    _load,
    _options,
    _params,
    _require,
    _Spinner,
    _warn,
    app,
    with_options,
)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  vl3 batch videos/ photos/*.jpg --out captions.jsonl\n\n"
        "  find /data -name '*.mp4' | vl3 batch --files-from - --out captions.jsonl --question \"Is anyone cooking?\"\n\n"
        "  vl3 batch /data --ext mp4,mkv --shard $SLURM_ARRAY_TASK_ID/16 --out part-$SLURM_ARRAY_TASK_ID.jsonl\n\n"
        "  vl3 batch --manifest items.jsonl --out results.jsonl\n\n"
        "  vl3 batch /data --engine ray --actors 8 --out captions.parquet\n\n"
        "Re-running the same command resumes: items already in --out with the same prompt, options and model "
        "are skipped. Exit codes: 0 all done, 1 some items failed, 2 usage error, 130 interrupted (Ctrl-C; SIGTERM 143, SIGHUP 129)."
    )
)
@with_options("model", "decoding", "media", "segments", "debug")
def batch(
    inputs: Annotated[list[str] | None, typer.Argument(help="Folders (recursive), files, glob patterns or URLs.", show_default=False)] = None,
    files_from: Annotated[str | None, typer.Option(help="Read more paths or URLs from this file, one per line (- = stdin).")] = None,
    manifest: Annotated[str | None, typer.Option(help="A JSONL file of items instead of INPUTS: {\"id\": ..., \"media\": [...], \"prompt\": ...} per line (- = stdin).")] = None,
    ext: Annotated[list[str] | None, typer.Option(help="Extensions to pick in folders and globs, e.g. mp4,mov (default: common image and video types).")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "--question", "-p", help="The prompt for every file (default: describe the image/video).")] = None,
    shard: Annotated[str | None, typer.Option(help="K/N: process only shard K (0-based) of N; each file lands in exactly one shard.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip items already in --out (the default).")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Also redo items whose record in --out is an error.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start --out afresh (also replaces a file that is not a vl3 results file).")] = False,
    batch_size: Annotated[int, typer.Option(help="Answers generated together in one forward pass (1 = one file at a time).")] = 8,
    workers: Annotated[int, typer.Option(help="Threads decoding the next files while the model works.")] = 2,
    out: Annotated[str | None, typer.Option("--out", "-o", help="The JSONL file to append to and resume from, or a .parquet file (default and - : stdout, no resume).", rich_help_panel=OUTPUT)] = None,
    engine: Annotated[Literal["local", "ray"], typer.Option(help="local: this process; ray: a Ray cluster, files read in CPU tasks, answered by --actors model replicas (pip install 'vl3cli\\[ray]').", rich_help_panel=RAY)] = "local",
    actors: Annotated[int, typer.Option(help="Model replicas (Ray actors), e.g. one per GPU.", rich_help_panel=RAY)] = 1,
    gpus_per_actor: Annotated[float | None, typer.Option(help="GPUs per actor (default: 1 when the cluster has GPUs and --device is not cpu, else 0).", show_default=False, rich_help_panel=RAY)] = None,
    ray_address: Annotated[str | None, typer.Option(help="The Ray cluster to join: auto, ray://HEAD:10001, ... (default: start or join a local Ray).", show_default=False, rich_help_panel=RAY)] = None,
    **options,
) -> None:
    """Caption or question many files into a JSONL (or Parquet) file, resumably."""
    from .. import batch as b
    from ..api import checked_question
    from ..inputs import Entry, expand_inputs, in_shard, parse_exts, parse_shard, read_manifest
    from ..outfile import Target, check_writable, create_empty, exclusive, opened

    params = _params(locals())

    if resume + retry_failed + overwrite > 1:
        raise UsageError("choose one of --resume, --retry-failed, --overwrite")
    if manifest is not None and (inputs or files_from is not None):
        raise UsageError("--manifest lists every item: give it without INPUTS or --files-from")
    if not inputs and files_from is None and manifest is None:
        raise UsageError("give folders, files or globs to process, --files-from FILE or --manifest FILE")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {workers})")
    ray_settings = None
    if engine == "ray":
        from ..distributed import RaySettings

        ray_settings = RaySettings(ray_address, actors, gpus_per_actor, batch_size, params["debug"] or _env_debug())
    else:
        ray_only = {"--actors": actors != 1, "--gpus-per-actor": gpus_per_actor is not None, "--ray-address": ray_address is not None}
        if given := [name for name, used in ray_only.items() if used]:
            raise UsageError(f"{given[0]} is for --engine ray")
    params["ray_settings"] = ray_settings
    mode = "retry-failed" if retry_failed else "overwrite" if overwrite else "resume"
    request = _options(params)
    target = Target.of(out)
    check_writable(target)
    if target.path is None:
        _require("stdout")
    if "-" in (files_from, manifest):
        _require("stdin")
    shard_kn = parse_shard(shard)
    if prompt is not None and not prompt.strip():
        raise UsageError(f"--prompt: {EMPTY_QUESTION}")
    checked_question(prompt, "--prompt")  # a byte that is not UTF-8: no tokenizer takes it (--system: Options)
    if manifest is not None:
        entries = read_manifest(manifest, prompt)
    else:
        unreadable: dict[str, str] = {}  # folders inside INPUTS that cannot be read: error records
        entries = [Entry((p,), prompt) for p in expand_inputs(inputs or [], files_from, parse_exts(ext), unreadable=unreadable)]
        entries += [Entry((d,), prompt, error=f"cannot read the folder {d}: {why}") for d, why in sorted(unreadable.items())]
    entries = [e for e in entries if in_shard(e.shard_key, shard_kn)]
    base = {"system": request.system, "model": model_label(params["model"], params["revision"]), "quantize": params["quantize"]}
    # (key, entry) pairs, not a dict: two entries with one key (read_manifest makes a repeated line an
    # error entry of its own name) would otherwise lose one of them without a trace
    keyed = [(b.record_key({"id": e.id, "media": list(e.media), "options": request.record(e.prompt), **base}), e) for e in entries]
    segmented = request.segments is not None
    with exclusive(target):  # from reading what is done to the last record: one run per file at a time
        plan = b.plan_segments(keyed, target, mode) if segmented else b.plan(keyed, target, mode)
        if not segmented:
            plan.todo = [(e, frozenset()) for e in plan.todo]
        summary = b.Summary(total=len(keyed), done_before=plan.done, failed_before=plan.failed_before, segments=segmented)
        create_empty(target)  # an empty shard still leaves its (empty) file
        if plan.todo:
            _run_batch(plan.todo, request, params, target, mode, summary)
        elif mode == "overwrite" and target.regular:
            with opened(target, replace=True):  # nothing to run: --overwrite still starts the file afresh
                pass
    print(summary.line(), file=sys.stderr)
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


def _run_batch(todo: list[tuple], options, params: dict, target, mode: str, summary) -> None:
    from .. import batch as b
    from ..outfile import opened

    with _engine(params, options) as results:
        total = None if summary.segments else summary.total  # segments: how many is known file by file
        progress, task = b.progress_bar(total, summary.done_before + summary.failed_before)

        def on_item(result) -> None:
            _warn(result.warnings if result.ok else [result.error], progress.console)
            progress.update(task, advance=1, ok=summary.ok, failed=summary.failed)

        with opened(target, replace=mode == "overwrite") as f, b.StopSignal() as stop, progress:
            b.write_results(results(todo, stop), f, summary, stop, on_item)


@contextmanager
def _engine(params: dict, options):
    """What answers a batch: `results(todo, stop)` -> Results (one per (inputs.Entry, segments to skip) pair, or one
    per segment when segmenting), from the model loaded in this
    process (`--engine local`) or from actors on a Ray cluster (`--engine ray`, distributed.py)."""
    if params["ray_settings"] is not None:
        from ..distributed import RayEngine

        with _Spinner("Starting Ray"):
            engine = RayEngine.start(**{k: params[k] for k in LOAD_KEYS}, options=options, settings=params["ray_settings"])
        with engine:
            yield engine.results
        return
    from ..pipeline import Item

    model = _load(params, options)

    def results(todo: list, stop):
        items = (Item(e.media, (e.prompt,), e.id, skip=skip, prepared=UsageError(e.error) if e.error else None)
                 for e, skip in todo)  # fmt: skip
        for _, result in model.run(items, batch_size=params["batch_size"], workers=params["workers"], check=stop.check):
            yield result

    yield results
