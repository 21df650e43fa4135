"""The ``sweep`` command line: parse and validate, call one library function, print a clean error.

TensorFlow and MLflow are imported inside the commands so ``sweep --help`` answers at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from sweep.cli_common import (
    CONFIG,
    DATA_OPTIONS,
    DEFAULTS,
    FIXED,
    FAMILY,
    TIME_BUDGET,
    TRACKING_OPTIONS,
    WEIGHTS,
    SweepGroup,
    keras_verbosity,
    options,
    quiet_tensorflow,
    stop_on_sigterm,
    tracking_settings_for,
)
from sweep.cli_results import COMMANDS
from sweep.cli_serve import COMMANDS as SERVE_COMMANDS
from sweep.precision import PRECISIONS
from sweep.results import interval_text
from sweep.server import redact
from sweep.spec import FINE_TUNE_PLANS, OBJECTIVES, TUNERS, SweepSpec


@click.group(cls=SweepGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sweep")
def main() -> None:
    """Hyperparameter sweeps of image classifiers with Keras Tuner, every trial tracked in MLflow."""
    # MLflow draws a progress bar for every artifact it downloads; the commands say what they fetch themselves
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


SWEEP_OPTIONS = options(
    click.option("--trials", default=DEFAULTS["trials"], show_default=True, type=click.IntRange(min=1),
                 help="Trials per family; trial 1 is always the study's model (the family's defaults)."),
    click.option("--tuner", default=DEFAULTS["tuner"], show_default=True, type=click.Choice(TUNERS),
                 help="Search strategy."),
    click.option("--objective", default=DEFAULTS["objective"], show_default=True, type=click.Choice(list(OBJECTIVES)),
                 help="What the tuner optimises and 'best' means: the final model's validation loss (lowest) or "
                      "accuracy (highest)."),
    click.option("--epochs", default=DEFAULTS["epochs"], show_default=True, type=click.IntRange(min=1),
                 help="Epochs per trial (Hyperband's maximum)."),
    DATA_OPTIONS,
    WEIGHTS,
    FIXED,
    TRACKING_OPTIONS,
    click.option("--no-cache", "feature_cache", flag_value=False, default=True,
                 help="A family with a cached frozen base only: train every trial on raw images through the full "
                      "model (the study's way, much slower) instead of on cached base features."),
    click.option("--prune/--no-prune", default=DEFAULTS["prune"], show_default=True,
                 help="Stop a trial at epoch 1, 3 or 9 (a family may declare a later first rung) when it is not in "
                      "the best third of the sweep's trials there (successive halving; random and Bayesian search; "
                      "families that allow it). Trial 1 runs in full."),
    click.option("--fine-tune", default=DEFAULTS["fine_tune"], show_default=True, type=click.Choice(FINE_TUNE_PLANS),
                 help="A family with a costly later stage (fine-tuning) only: 'late': the last 30 %% of the trials "
                      "take it, drawn afresh; 'leaders': each trial of the later half refines one of the three best "
                      "without it, reproduced exactly; 'any': drawn with the rest in every trial."),
    click.option("--precision", default=DEFAULTS["precision"], show_default=True, type=click.Choice(PRECISIONS),
                 help="From-scratch families: mixed_bfloat16 computes the convolutions in bfloat16 (weights, logits "
                      "and loss stay float32); auto uses it where the CPU (AVX512_BF16, AMX) or GPU has it."),
    click.option("-q", "--quiet", is_flag=True, help="No per-epoch Keras progress; one line per trial only."),
)


def _specs(families, o: dict) -> list[SweepSpec]:
    from search_spaces import registry

    given = [name for name, set_ in (("--weights", o.get("weights", DEFAULTS["weights"]) != DEFAULTS["weights"]),
                                     ("--no-cache", o.get("feature_cache") is False)) if set_]
    # an option that would change nothing is a mistake worth one line
    if given and not any(registry.family_class(f).uses_weights for f in families):
        raise click.UsageError(f"{' and '.join(given)} only apply to a family that loads pretrained weights (see "
                               f"`sweep families`); drop {'them' if len(given) > 1 else 'it'} for --family "
                               f"{families[0]}.")
    return [SweepSpec.from_options(f, o) for f in families]


def _tracking_args(o: dict) -> list[str]:
    """What a worker process needs to find the sweep: the tracking config and experiment."""
    args = ["--config", str(Path(o["config_path"]).resolve())] if o["config_path"] else []
    return args + (["--experiment", o["experiment"]] if o["experiment"] else [])


def _print_results(results, tracking_settings) -> None:
    click.echo("")
    for result in results:
        best = result.best
        if best is None:
            click.echo(f"{result.family}: no trial finished (MLflow run {result.run_id})")
            continue
        click.echo(
            f"{result.family}: best trial {best.number} (by {result.objective}) val {best.val_accuracy:.1%} "
            f"(loss {best.val_loss:.3f}) "
            f"test {best.test_accuracy:.1%}{interval_text(best)} vs baseline {result.baseline_accuracy:.1%} "
            f"(MLflow run {result.run_id})"
        )
    click.echo(f"Runs are in {redact(tracking_settings.tracking_uri)}, experiment {tracking_settings.experiment!r}. "
               "Compare them with: sweep ui")


@main.command()
@FAMILY
@SWEEP_OPTIONS
@click.option("--resume", is_flag=True,
              help="Continue the newest unfinished sweep of --family (or the one --sweep names) with its own "
                   "settings: finished trials are kept, the interrupted one runs again.")
@click.option("--sweep", "sweep_name", default=None,
              help="The new sweep's name (default: family, tuner and time); with --resume, the sweep to continue.")
@click.option("--workers", default=0, type=click.IntRange(min=0),
              help="Run trials in N worker processes on this machine, under a Keras Tuner chief.")
@TIME_BUDGET
def run(family, resume, sweep_name, workers, time_budget, **o) -> None:
    """Run a sweep and log every trial to MLflow.

    Example: sweep run --family transfer --trials 20
    """
    quiet_tensorflow()
    stop_on_sigterm()
    from sweep.api import run_sweep

    tracking_settings = tracking_settings_for(o["config_path"], o["experiment"])
    from search_spaces import registry

    families = registry.study_families() if family == "all" else [family]
    if workers:
        if family == "all" or resume:
            raise click.UsageError("--workers runs one family's new sweep; drop --resume and pick a family.")
        from sweep.distributed import Chief, LocalWorkers, free_port

        result = _serve(_specs(families, o)[0], tracking_settings, sweep_name,
                        Chief("127.0.0.1", free_port(), workers=LocalWorkers(workers, _tracking_args(o))),
                        time_budget)
        _print_results([result], tracking_settings)
        return
    results = run_sweep(_specs(families, o), config=o["config_path"], experiment=o["experiment"], name=sweep_name,
                        resume=resume, time_budget=time_budget, progress=click.echo,
                        epoch_lines=keras_verbosity(o["quiet"]))
    _print_results(results, tracking_settings)


def _serve(spec: SweepSpec, tracking_settings, sweep_name, chief, time_budget: float | None = None):
    from sweep.study import check_new_name, default_name, prepare, run_sweep

    name = sweep_name or default_name(spec)
    check_new_name(tracking_settings, name, spec.family)
    started = time.time()  # the budget counts from the command's start, data loading included
    prepared = prepare(spec, tracking_settings, click.echo)
    return run_sweep(spec, prepared, tracking_settings, click.echo, name=name, chief=chief,
                     deadline=None if time_budget is None else started + time_budget)


@main.command()
@click.option("--family", required=True, metavar="FAMILY",
              help="The family to sweep: a name from `sweep families`, package.module:Class or path/to/file.py:Class.")
@SWEEP_OPTIONS
@click.option("--sweep", "sweep_name", default=None, help="The sweep's name (default: family, tuner, time).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve the oracle on (default 127.0.0.1: this machine only). Its gRPC has no "
                   "authentication: reach it over an SSH tunnel, or give a private network's address.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--trial-timeout", default=None, type=click.FloatRange(min=1),
              help="Seconds without a heartbeat (workers send one per epoch) after which a trial is FAILED.")
@click.option("--trial-retries", default=1, show_default=True, type=click.IntRange(min=0),
              help="How many times the values of a trial failed by --trial-timeout run again, as a new trial.")
@TIME_BUDGET
def chief(family, sweep_name, host, port, trial_timeout, trial_retries, time_budget, **o) -> None:
    """Serve a sweep's oracle to `sweep worker` processes (Keras Tuner's distributed mode)."""
    quiet_tensorflow()
    stop_on_sigterm()
    from sweep.distributed import Chief

    tracking_settings = tracking_settings_for(o["config_path"], o["experiment"])
    serving = Chief(host, port, trial_timeout, trial_retries)
    serving.check_address()
    result = _serve(_specs([family], o)[0], tracking_settings, sweep_name, serving, time_budget)
    _print_results([result], tracking_settings)


@main.command()
@click.option("--chief", "chief_address", required=True, help="The chief's HOST:PORT.")
@click.option("--sweep", "sweep_name", required=True, help="The sweep's name, as the chief printed it.")
@click.option("--tuner-id", default=None,
              help="This worker's id (default: worker-HOST-PID); restart a dead worker with the same id.")
@click.option("--chief-timeout", default=60, show_default=True, type=click.FloatRange(min=1),
              help="Seconds to wait for the chief to answer, at the start and on every call after: a worker that "
                   "cannot reach its chief, or whose chief vanished, says so and exits 1.")
@TRACKING_OPTIONS
def worker(chief_address, sweep_name, tuner_id, chief_timeout, experiment, config_path) -> None:
    """Run trials for a chief until its search is over; each trial is logged under the chief's sweep run."""
    quiet_tensorflow()
    stop_on_sigterm()
    import socket

    from sweep.distributed import run_worker

    tuner_id = tuner_id or f"worker-{socket.gethostname()}-{os.getpid()}"
    done = run_worker(tracking_settings_for(config_path, experiment), chief_address, sweep_name, tuner_id, click.echo,
                      chief_timeout=chief_timeout)
    click.echo(f"Worker {tuner_id} finished: {done} trial(s) run here.")


@main.command()
@click.option("--family", required=True, metavar="FAMILY",
              help="The family to time: a name from `sweep families`, package.module:Class or path/to/file.py:Class.")
@click.option("--trials", default=20, show_default=True, type=click.IntRange(min=1),
              help="Trials of the whole sweep timed our way.")
@click.option("--plain-trials", default=1, show_default=True, type=click.IntRange(min=1),
              help="Trials run the plain way (raw images, stock Keras Tuner); trial 1 is the defaults.")
@click.option("--epochs", default=DEFAULTS["epochs"], show_default=True, type=click.IntRange(min=1))
@DATA_OPTIONS
@WEIGHTS
@FIXED
@click.option("--experiment", default="sweep-bench", show_default=True, help="MLflow experiment for our sweeps.")
@CONFIG
@click.option("--warm", is_flag=True,
              help="One sweep on the configured feature cache (default: a cold, temporary cache, then warm).")
@click.option("--cut-costs", is_flag=True,
              help="A family that fine-tunes on cached activations only: instead, time one fine-tuning epoch from "
                   "each cut point and size its cache.")
@click.option("-q", "--quiet", is_flag=True)
def bench(family, trials, plain_trials, epochs, data_dir, seed, batch_size, image_size, weights, fixed, experiment,
          config_path, warm, cut_costs, quiet) -> None:
    """Time the same trial the plain way and ours, and our whole sweep cold and warm; print a table. With
    --cut-costs, what fine-tuning from each cut point costs instead."""
    quiet_tensorflow()
    from sweep.bench import format_table, run_bench
    from sweep.study import prepare

    from feature_cache.trainer import CachedTraining
    from search_spaces import registry

    if cut_costs and not issubclass(registry.family_class(family), CachedTraining):
        raise click.BadParameter(f"family {family} does not fine-tune on cached activations.", param_hint="--cut-costs")
    tracking_settings = tracking_settings_for(config_path, experiment)
    spec = SweepSpec.from_options(family, locals())
    prepared = prepare(spec, tracking_settings, report=click.echo)
    if cut_costs:
        from feature_cache.features import PoolSpec
        from sweep.bench import cut_costs as measure, format_cut_costs

        hypermodel = registry.make(family, len(prepared.splits.class_names), prepared.splits.image_size,
                                   prepared.weights_path)
        views = PoolSpec().views_per_image
        rows = measure(hypermodel, len(prepared.splits.train), len(prepared.splits.validation), spec.batch_size,
                       views, report=click.echo)
        click.echo("")
        click.echo(format_cut_costs(rows, prepared.splits.image_size, len(prepared.splits.train), views))
        return
    result = run_bench(spec, prepared, tracking_settings, plain_trials, warm_only=warm, report=click.echo,
                       verbose=keras_verbosity(quiet))
    click.echo("")
    click.echo(format_table(result))


@main.command()
@click.argument("names", nargs=-1, metavar="[FAMILY]...")
def families(names) -> None:
    """List the registered model families; with FAMILY (a name, package.module:Class or path/to/file.py:Class),
    what it can do and its hyperparameters (type, range or choices, default).

    Listing reads package metadata only: nothing is imported. A package registers its own families under the
    `sweep.families` entry-point group.
    """
    from search_spaces import registry

    if not names:
        entries = registry.registered()
        width = max((len(e.name) for e in entries), default=0)
        for entry in entries:
            origin = "built in" if entry.builtin else f"from {entry.package}"
            click.echo(f"{entry.name:<{width}}  {entry.target} ({origin})")
        click.echo("\n`sweep families NAME` shows a family's hyperparameters; `--family` also takes "
                   "package.module:Class or path/to/file.py:Class (docs/your-own-family.md).")
        return
    quiet_tensorflow()
    from search_spaces.space import describe

    for name in names:
        cls = registry.family_class(name)
        family = registry.make(name)
        click.echo(f"{registry.display_name(name)}: {family.description}")
        can = [text for text, has in (
            (f"study's validation accuracy {cls.study_range[0]:.0%}-{cls.study_range[1]:.0%}" if cls.study_range
             else "", bool(cls.study_range)),
            ("loads --weights", cls.uses_weights), ("pruned early when hopeless", cls.prunable),
            ("mixed bfloat16 where the CPU has it", cls.mixed_precision),
            (f"a later stage switched by {cls.stage_switch[0]}" if cls.stage_switch else "", bool(cls.stage_switch)),
        ) if has]
        if can:
            click.echo(f"  {'; '.join(can)}")
        for row in describe(name):
            when = f" ({row['when']})" if row["when"] else ""
            click.echo(f"  {row['name']:<20} {row['type']:<7} {row['domain']:<44} default {row['default']}{when}")
        click.echo("")


for _command in [*COMMANDS, *SERVE_COMMANDS]:
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
