"""BAFFLE on Flower: a ``ServerApp`` driving the reference server (``gather.run_server``) and a
``ClientApp`` running ``baffle_edge.client.run_task`` on a runtime chosen by name
(``client.client_train``; ``client.client_query`` answers which partition a node holds).

Entry points: ``baffle_edge.flower.app:server_app`` / ``:client_app`` (the app folder written by
``baffle-edge flower app``), ``baffle-edge flower simulate`` (Flower's simulation runtime).
"""
from __future__ import annotations

import logging

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .client import client_query, client_train
from .gather import log, run_server
from .runconfig import config_from_run_config

client_app = ClientApp()
client_app.train()(client_train)
client_app.query()(client_query)

server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    cfg, flower = config_from_run_config(dict(context.run_config))
    if not log.handlers:  # our progress lines only (the root logger at INFO would log every HTTP poll)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s baffle-edge: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    log.info("BAFFLE run: %d clients, %d rounds, runtime %s, client data: %s -> %s", cfg.clients, cfg.rounds,
             cfg.runtime, flower.client_data, flower.out)
    run_server(grid, cfg, flower, progress=False)
