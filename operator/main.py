"""``meshaccel-operator``: the cluster-level operator process.

    meshaccel-operator [--namespace NS] [--peering NAME | --standalone] [--liveness URL]
                       [--agent-image IMAGE] [--agent-image-pull-secrets NAME,...]
                       [--agent-pod-annotations JSON] [--agent-pod-labels JSON]
                       [--agent-node-selector JSON] [--agent-affinity JSON]
                       [--agent-resources JSON] [--agent-priority-class NAME]
                       [--metrics-port PORT] [--push-window SECONDS] [--log-format json|text]
    meshaccel-operator pre-delete [...]    Helm's pre-delete hook (:mod:`.predelete`)

Watches MeshAccelerations, namespaces, nodes and pods cluster-wide (Kopf), keeps each
resource's agents (a DaemonSet in ``--namespace``) as rendered, and pushes every node's pod
set to that node's agent. Every agent runs ``--agent-image``, whatever a MeshAcceleration
says. Run two replicas: with ``--peering`` (the default) Kopf's peering
keeps exactly one of them working; each replica picks a random priority, because replicas of
equal priority would all pause.

Every flag has an environment variable: MESHACCEL_NAMESPACE, MESHACCEL_PEERING,
MESHACCEL_LIVENESS, MESHACCEL_AGENT_IMAGE, MESHACCEL_AGENT_IMAGE_PULL_SECRETS,
MESHACCEL_AGENT_POD_ANNOTATIONS, MESHACCEL_AGENT_POD_LABELS, MESHACCEL_AGENT_NODE_SELECTOR,
MESHACCEL_AGENT_AFFINITY, MESHACCEL_AGENT_RESOURCES, MESHACCEL_AGENT_PRIORITY_CLASS,
MESHACCEL_METRICS_PORT, MESHACCEL_PUSH_WINDOW, MESHACCEL_LOG_FORMAT, MESHACCEL_LOG_LEVEL,
MESHACCEL_PEERING_LIFETIME, MESHACCEL_LEASE_DURATION, MESHACCEL_RESYNC_INTERVAL (see
:mod:`.config`).
Exit codes: 0 stopped as asked, 1 failed, 2 invalid arguments.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import sys
from collections.abc import Sequence

import kopf
import prometheus_client

from meshaccel.contract.logs import configure_logging
from meshaccel.contract.version import VERSION
from meshaccel.operator import handlers, metrics
from meshaccel.operator.config import operator_config, parse_args


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["pre-delete"]:
        from meshaccel.operator import predelete  # the hook's process runs nothing else

        return predelete.main(arguments[1:])
    args = parse_args(arguments)
    configure_logging(args.log_format, args.log_level)
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("meshaccel.operator").info(
        f"meshaccel-operator {VERSION} starting",
        extra={"version": VERSION, "python": platform.python_version()},
    )
    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port, registry=metrics.REGISTRY)
    try:
        asyncio.run(
            kopf.operator(
                registry=handlers.REGISTRY,
                clusterwide=True,
                standalone=args.standalone,
                peering_name=None if args.standalone else args.peering,
                liveness_endpoint=args.liveness or None,
                memo=kopf.Memo(config=operator_config(args)),
            )
        )
    except KeyboardInterrupt:
        return 0
    except Exception:
        logging.getLogger("meshaccel.operator").exception("the operator failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
