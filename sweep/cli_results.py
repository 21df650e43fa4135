"""The commands that take results away: best (and export), predict, report, data, ui."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sweep.cli_common import (
    CONFIG,
    DATA_OPTIONS,
    TRACKING_OPTIONS,
    check_out_folder,
    quiet_tensorflow,
    stop_on_sigterm,
    tracking_settings_for,
)
from sweep.config import load_tracking, require_store
from sweep.errors import SweepError
from sweep.results import RANKINGS
from sweep.server import check_server, redact
from sweep.spec import OBJECTIVES, SweepSpec


def _parse_formats(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    from sweep.formats import parse_formats

    try:
        return parse_formats(value)
    except SweepError as exc:
        raise click.BadParameter(str(exc).removeprefix("--format ")) from None


@click.command()
@TRACKING_OPTIONS
@click.option("--family", default=None, metavar="FAMILY",
              help="Only this family's trials (its name, or the reference it was swept with).")
@click.option("--metric", default=None, type=click.Choice(list(RANKINGS)),
              help="What 'best' means: the lowest final validation loss, or the highest accuracy. Default: the "
                   "objective the sweeps ran with (val_loss unless --objective said otherwise).")
@click.option("--export", "export_dir", type=click.Path(path_type=Path), default=None,
              help="Write the best trial's model and records to this new folder and register the model.")
@click.option("--format", "formats", default=None, callback=_parse_formats, metavar="F[,F...]",
              help="With --export: the formats to write, each verified in its own runtime on the sweep's test "
                   "images: keras, saved_model (TensorFlow Serving), litert (float32 .tflite), litert_int8 "
                   "(quantised .tflite), onnx, or all. Default: keras,saved_model.")
@click.option("--no-verify", is_flag=True,
              help="With --export: skip re-evaluating the model, and checking each format, on the test split.")
def best(experiment, config_path, family, metric, export_dir, formats, no_verify) -> None:
    """Print the best finished trial across all sweeps; optionally export and register its model."""
    if no_verify and export_dir is None:
        raise click.UsageError("--no-verify only applies with --export DIR.")
    if formats is not None and export_dir is None:
        raise click.UsageError("--format only applies with --export DIR.")
    if export_dir is not None:  # listing the best trial needs no TensorFlow: it starts in about a second
        quiet_tensorflow()
    from sweep.api import export_best, find_best
    from sweep.formats import DEFAULT_FORMATS, check_available

    formats = formats or DEFAULT_FORMATS
    if export_dir is not None:
        check_available(formats)  # a missing converter or runtime is refused before anything is read or written
        check_out_folder(export_dir, "--export")
        stop_on_sigterm()  # SIGTERM as Ctrl-C: the export is undone, not left half-made
    settings = tracking_settings_for(config_path, experiment)
    where = {"config": config_path, "experiment": experiment}
    if family is not None and ":" in family:  # the reference a sweep ran with: its trials carry its name
        from search_spaces import registry

        family = registry.display_name(family)
    found = find_best(family=family, metric=metric, **where)
    click.echo(f"Best trial by {found.metric} in experiment {settings.experiment!r}:")
    click.echo(found.describe())
    if export_dir is not None and not found.has_model:
        found = find_best(family=family, metric=found.metric, with_model=True, **where)
        click.echo(f"That trial kept no model (only trials that improved their sweep do); exporting the best "
                   f"trial that did:\n{found.describe()}")
    if export_dir is not None:
        result = export_best(found, export_dir, verify=not no_verify, progress=click.echo, formats=formats, **where)
        registry = result.registry
        click.echo(f"Exported {', '.join(formats)} to {export_dir} (each takes raw {found.params.get('image_size', '')} "
                   f"RGB images, 0-255, and gives logits); registered as {registry['uri']}")
        click.echo(f"Serve it: sweep serve {registry['uri']} (or, with MLflow's server: "
                   f"MLFLOW_TRACKING_URI={redact(settings.tracking_uri)} mlflow models serve -m {registry['uri']} "
                   "--env-manager local --host 127.0.0.1 --port 5001)")


@click.command()
@click.option("--model", "model_option", type=click.Path(exists=True, path_type=Path), default=None,
              help="The model (else the first argument): an export folder, or one of its model files.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="[MODEL] IMAGES...")
def predict(model_option, paths) -> None:
    """Predict the class of each image (folders are walked) with an export folder or one of its model files
    (.keras, a SavedModel folder, .tflite, .onnx), each run in its own runtime: `sweep predict MODEL IMAGES...`
    or `sweep predict --model MODEL IMAGES...`.

    Unreadable or non-image files are reported by name and skipped; the exit code is 1 if any failed.
    """
    if model_option is None:
        model, images = paths[0], paths[1:]
        if not model.exists():
            raise click.BadParameter(f"Path '{model}' does not exist.", param_hint="'MODEL'")
        if not images:
            raise click.UsageError("Missing argument 'IMAGES...': name the images or folders to predict.")
    else:
        model, images = model_option, paths
    quiet_tensorflow()
    from sweep.api import predict as run_predict

    results = run_predict(model, list(images))
    failed = 0
    for r in results:
        if r.error:
            failed += 1
            click.echo(f"{r.path}: skipped, {r.error}", err=True)
        else:
            click.echo(f"{r.path}\t{r.label}\t{r.probability:.4f}")
    if not results:
        click.echo("Error: no files found in the paths given.", err=True)
        sys.exit(1)
    click.echo(f"{len(results) - failed} predicted, {failed} skipped", err=True)
    sys.exit(1 if failed else 0)


@click.command()
@TRACKING_OPTIONS
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("sweep-output/report"),
              show_default=True, help="Folder for report.md and report.png.")
@click.option("--metric", default=None, type=click.Choice(list(OBJECTIVES)),
              help="What picks each family's best trial. Default: the objective the sweeps ran with.")
def report(experiment, config_path, out_dir, metric) -> None:
    """The study's table: baseline, then each family's best val and test accuracy, gain and overfitting gap."""
    quiet_tensorflow()
    from sweep.report import build_report, to_markdown, write_report

    check_out_folder(out_dir, "--out")
    settings = tracking_settings_for(config_path, experiment)
    rows = build_report(settings, metric)
    files, run_id = write_report(rows, settings, out_dir)
    click.echo(to_markdown(rows, settings.experiment))
    click.echo(f"Saved {', '.join(map(str, files))}; logged to MLflow run {run_id}.")


@click.command()
@TRACKING_OPTIONS
@DATA_OPTIONS
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("sweep-output/data"),
              show_default=True)
def data(experiment, config_path, data_dir, seed, batch_size, image_size, out_dir) -> None:
    """Class counts per split, the baseline, sample images and augmentation pictures."""
    quiet_tensorflow()
    from sweep.report import write_data_overview
    from sweep.study import prepare

    check_out_folder(out_dir, "--out")
    settings = tracking_settings_for(config_path, experiment)
    from search_spaces import registry

    spec = SweepSpec.from_options(registry.study_families()[0], locals())  # data options only
    prepared = prepare(spec, settings, report=click.echo, need_weights=False)
    files, run_id = write_data_overview(prepared.splits, settings, out_dir, seed)
    splits = prepared.splits
    for split, counts in splits.counts().items():
        click.echo(f"{split:<11} " + "  ".join(f"{name} {n}" for name, n in counts.items()))
    click.echo(f"baseline: always '{splits.class_names[splits.majority_class]}' -> "
               f"{splits.baseline_accuracy:.1%} on the test split")
    click.echo(f"Saved {', '.join(map(str, files))}; logged to MLflow run {run_id}.")


@click.command()
@CONFIG
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 127.0.0.1 keeps it local.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="The UI's server processes (MLflow's own default is 4, each a few hundred MB; one user's "
                   "browser needs two).")
def ui(config_path, host, port, workers) -> None:
    """Start the MLflow UI on the configured store and print its address."""
    import os
    import shutil

    settings = load_tracking(config_path)
    if settings.is_local:
        require_store(settings)
        _check_store_readable(settings.tracking_uri)
        _check_port_free(host, port)
    if not settings.is_local:
        check_server(settings.tracking_uri, settings.experiment)
        click.echo(f"Runs live on the tracking server {redact(settings.tracking_uri)}: open it in a browser.")
        return
    sibling = Path(sys.executable).with_name("mlflow")  # the mlflow of this environment first
    mlflow_bin = str(sibling) if sibling.exists() else shutil.which("mlflow")
    if mlflow_bin is None:
        raise SweepError("the mlflow command is not installed here; pip install mlflow.")
    click.echo(f"MLflow UI for {redact(settings.tracking_uri)} at http://{host}:{port} (Ctrl-C stops it)", err=False)
    link = _experiment_link(settings, f"http://{host}:{port}")
    if link:
        click.echo(f"Experiment {settings.experiment!r}, its runs: {link}")
    command = [mlflow_bin, "ui", "--backend-store-uri", settings.tracking_uri, "--host", host, "--port", str(port),
               "--workers", str(workers)]
    # Become the MLflow UI (exec), so Ctrl-C and SIGTERM reach it and it stops its own worker processes;
    # a child left behind a dead parent would keep its server and job runners alive.
    sys.stdout.flush()
    os.execv(mlflow_bin, command)


def _experiment_link(settings, base: str) -> str | None:
    """The experiment's runs page. MLflow 3's UI opens experiments on its GenAI overview until the user picks
    "Model training" in its sidebar; ``workflowType=machine_learning`` in the link opens the training runs."""
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri=settings.tracking_uri).get_experiment_by_name(settings.experiment)
    if experiment is None:
        return None
    return f"{base}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"


def _check_store_readable(tracking_uri: str) -> None:
    """Refuse a store MLflow cannot open (an unknown scheme, a broken database) before the UI starts on it."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
    except Exception as exc:  # MLflow raises several kinds for a URI it cannot use
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SweepError(f"cannot read MLflow store {redact(tracking_uri)}: {first[:300]}; fix tracking_uri in mlflow.yaml "
                         "or MLFLOW_TRACKING_URI.") from None


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another server holds, before the MLflow UI starts and fails on it."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SweepError(f"cannot serve on {host}:{port} ({exc.strerror}); pick another with --port.") from None


COMMANDS = [best, predict, report, data, ui]
