"""`recupdate operator`: run the Kubernetes operator (kopf) with recupdate's handlers and settings.

    recupdate operator --all-namespaces --metrics-port 8080 --liveness http://0.0.0.0:8081/healthz
    recupdate operator --namespace ml --namespace ml-staging --peering recupdate --priority 10

The store DSN for policies without spec.store.secretRef comes from $RECUPDATE_STORE_DSN; their jobs read it
from the Secret named by --default-store-secret (in the policy's namespace). kopf, kubernetes and psycopg
are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from recupdate_workloads.contract.env import DSN_ENV


def _secret_ref(text: str) -> tuple[str, str]:
    name, _, key = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError("expected NAME or NAME:KEY")
    return name, key or "dsn"


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def configure(p: argparse.ArgumentParser) -> None:
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; globs like 'ml-*' work)",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster (the default)")
    p.add_argument(
        "--metrics-port", type=int, default=8080, metavar="PORT", help="Prometheus /metrics port (0: off; 8080)"
    )
    p.add_argument(
        "--metrics-address", default="0.0.0.0", metavar="ADDR", help="address the metrics server binds (0.0.0.0)"
    )
    p.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        help="kopf's liveness endpoint, e.g. http://0.0.0.0:8081/healthz (off unless given)",
    )
    peering = p.add_mutually_exclusive_group()
    peering.add_argument("--peering", default=None, metavar="NAME", help="kopf peering object: one active operator")
    peering.add_argument("--standalone", action="store_true", help="no peering (the default)")
    p.add_argument("--priority", type=int, default=0, help="peering priority of this operator (0)")
    p.add_argument(
        "--resync",
        type=_positive,
        default=900.0,
        metavar="SECONDS",
        help="reconcile every policy at least this often, besides its schedule (900)",
    )
    p.add_argument("--workers", type=int, default=8, help="policies reconciled in parallel (8)")
    p.add_argument(
        "--default-store-secret",
        type=_secret_ref,
        default=None,
        metavar="NAME[:KEY]",
        help="Secret (in each policy's namespace) with the DSN for jobs of policies without spec.store.secretRef",
    )
    p.add_argument(
        "--time-scale",
        type=_positive,
        default=1.0,
        metavar="K",
        help="testing and benchmarks only: run the controller's clock K times faster (1)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log more (kopf's verbose mode)")
    p.add_argument("--debug", action="store_true", help="log everything (kopf's debug mode)")


def run(args: argparse.Namespace) -> int:
    import kopf

    from . import metrics
    from .api import SecretKeyRef
    from .controller import Controller, ControllerConfig, register
    from .events import RedactingFilter

    kopf.configure(verbose=args.verbose, debug=args.debug)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    log = logging.getLogger("recupdate.operator")

    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    secret = (
        SecretKeyRef(name=args.default_store_secret[0], key=args.default_store_secret[1])
        if (args.default_store_secret)
        else None
    )
    controller = Controller(
        config=ControllerConfig(
            resync_seconds=args.resync,
            workers=args.workers,
            default_store_secret=secret,
            default_dsn=os.environ.get(DSN_ENV) or None,
            time_scale=args.time_scale,
        )
    )
    registry = register(kopf.OperatorRegistry(), controller, peering=args.peering is not None)

    @kopf.on.login(registry=registry, id="recupdate_login")
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In a pod: its service account; elsewhere: $KUBECONFIG (read now) or ~/.kube/config.
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    namespaces = list(args.namespace)
    clusterwide = args.all_namespaces or not namespaces
    if not namespaces and not args.all_namespaces:
        log.info("no --namespace given: watching all namespaces")
    kopf.run(
        registry=registry,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        namespaces=namespaces,
        clusterwide=clusterwide,
        liveness_endpoint=args.liveness,
    )
    return 0
