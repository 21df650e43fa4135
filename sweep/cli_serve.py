"""`sweep serve` and `sweep loadtest`: an exported model behind HTTP, and the load test that measures it."""

from __future__ import annotations

import re

import click

from sweep.cli_common import TRACKING_OPTIONS, quiet_tensorflow, tracking_settings_for
from sweep.serving import (DEFAULT_BATCH_WINDOW, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY,
                           DEFAULT_MAX_PIXELS, PREFERRED_FORMATS, Limits, default_max_batch, is_loopback)


def _size(text: str) -> int:
    """``20MB``, ``512KB``, ``1000000`` -> bytes."""
    found = re.fullmatch(r"\s*(\d+)\s*(b|kb|mb|gb)?\s*", text.lower())
    if not found:
        raise click.BadParameter(f"{text!r} is not a size; write e.g. 20MB or 512KB.")
    return int(found.group(1)) * {None: 1, "b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30}[found.group(2)]


@click.command()
@TRACKING_OPTIONS
@click.argument("model", required=False, metavar="[MODEL]")
@click.option("--format", "wanted_format", default=None, type=click.Choice(PREFERRED_FORMATS),
              help="The runtime: the export's LiteRT file by default where LiteRT is installed, then ONNX Runtime, "
                   "then Keras.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 127.0.0.1 keeps it local.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--batch-window", default=DEFAULT_BATCH_WINDOW * 1000, show_default=True, type=click.FloatRange(0, 1000),
              help="Milliseconds the server waits for more requests to batch with the first waiting one.")
@click.option("--max-batch", default=None, type=click.IntRange(1, 1024),
              help="Most images run through the model at once (1: no batching). Default: 1 for LiteRT, which ran a "
                   "single image as fast per image as a batch on the CPUs measured, else "
                   f"{DEFAULT_MAX_BATCH}.")
@click.option("--max-body", default=f"{DEFAULT_MAX_BODY // 2**20}MB", show_default=True,
              help="Largest request body taken (413 above it, before it is read).")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(1),
              help="Most pixels (width x height) an image may declare (413 above it, before it is decoded).")
@click.option("--idle-timeout", default=DEFAULT_IDLE_TIMEOUT, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a connection may stay silent (an idle keep-alive, or a request whose headers or body stop "
                   "coming: 408) before it is closed.")
@click.option("--reload-on-alias", is_flag=True,
              help="With models:/NAME@ALIAS: poll the registry and swap in the version the alias moves to.")
@click.option("--reload-interval", default=10.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds between polls of the registry (--reload-on-alias).")
def serve(experiment, config_path, model, wanted_format, host, port, batch_window, max_batch, max_body, max_pixels,
          idle_timeout, reload_on_alias, reload_interval) -> None:
    """Serve a model over HTTP: POST an image to /predict, get its class. MODEL is an export folder from
    `sweep best --export`, one of its model files, or models:/NAME@ALIAS (default: the configured registered
    model's champion). Also GET /health, /ready, /metadata and /metrics (Prometheus)."""
    settings = tracking_settings_for(config_path, experiment)
    model = model or f"models:/{settings.registered_model}@champion"
    if reload_on_alias and not (model.startswith("models:/") and "@" in model):
        raise click.UsageError("--reload-on-alias needs MODEL as models:/NAME@ALIAS.")
    limits = Limits(max_body=_size(max_body), max_pixels=max_pixels, idle_timeout=idle_timeout)
    quiet_tensorflow()
    from sweep.serving import load_served, serve as run_server

    loaded = load_served(model, wanted_format, settings.registered_model, click.echo, settings.tracking_uri)
    if not is_loopback(host):
        click.echo(f"Warning: listening on {host}: this endpoint has no login of its own. Put it behind your "
                   "team's HTTPS proxy (README, 'Serving'), as the tracking server is.", err=True)
    watch = (model, wanted_format, settings.registered_model, reload_interval, settings.tracking_uri) \
        if reload_on_alias else None
    if max_batch is None:
        max_batch = default_max_batch(loaded.format)
    run_server(loaded, host, port, limits, batch_window / 1000, max_batch, click.echo, watch)


@click.command()
@click.argument("url")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--clients", default=16, show_default=True, type=click.IntRange(1, 256),
              help="Concurrent clients of the throughput phase.")
@click.option("--seconds", default=60.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Length of the throughput phase.")
@click.option("--single", default=200, show_default=True, type=click.IntRange(0),
              help="Requests of the one-client latency phase (0: skip it).")
def loadtest(url, images, clients, seconds, single) -> None:
    """Measure a running `sweep serve` at URL (loopback only) with the JPEG/PNG files IMAGES (folders are
    walked): one client's latency, then CLIENTS concurrent clients for SECONDS: throughput, latency, errors and
    the server's memory (from /metrics)."""
    from sweep.loadtest import run

    result = run(url, list(images), clients=clients, seconds=seconds, single=single, report=click.echo)
    click.echo(result.table())


COMMANDS = [serve, loadtest]
