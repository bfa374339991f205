"""BAFFLE on Flower (docs/flower.md): the reference server as a ``ServerApp``, the device side as a
``ClientApp``, and what a SuperLink/SuperNode federation needs besides them.

Imported here (no flwr, no torch): the run's configuration, the app folder, credentials, node data,
and the two ways to run it from this machine:

- ``runconfig``: ``FlowerConfig`` and ``config_from_run_config`` (the app's run config);
- ``appfolder``: ``write_app``, the folder ``flwr run`` submits;
- ``credentials``: ``make_certificates`` (a private CA, the SuperLink's TLS certificate) and
  ``make_node_keys`` (SuperNode authentication key pairs);
- ``nodedata``: ``load_node_data`` / ``normalise`` (a SuperNode's own data), ``write_shards``;
- ``processes``: Flower's processes started, followed and stopped from here;
- ``simulation``: ``simulate``, a run on Flower's simulation runtime;
- ``federation``: ``LocalFederation``, a secured federation on 127.0.0.1, and ``run_local``;
- ``cli``: ``baffle-edge flower ...``.

Imported on their own, they need flwr (``pip install 'baffle-edge[flower]'``):

- ``records``: the messages (what a round sends, how each end builds and parses it);
- ``gather``: ``FlowerGather``, the server's ``gather`` hook over a Flower Grid, and ``run_server``;
- ``client``: the ClientApp's ``train`` and ``query`` handlers and the device they run on;
- ``app``: ``server_app`` and ``client_app``, the components an app folder names.

Imports go one way: ``app`` -> ``gather``, ``client`` -> ``records``, ``nodedata``, ``runconfig``;
``cli`` -> ``federation``, ``simulation`` -> ``appfolder``, ``credentials``, ``processes``.
"""
from .appfolder import write_app
from .credentials import make_certificates, make_node_keys
from .federation import LocalFederation, run_local
from .nodedata import load_node_data, normalise, write_shards
from .runconfig import FlowerConfig, config_from_run_config
from .simulation import simulate

__all__ = ["FlowerConfig", "LocalFederation", "config_from_run_config", "load_node_data", "make_certificates",
           "make_node_keys", "normalise", "run_local", "simulate", "write_app", "write_shards"]
