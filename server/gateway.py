"""The devices' door to the SuperLink: a TLS reverse proxy that forwards the Fleet API and nothing else.

Flower 1.41 serves the Fleet API (devices), the Control API (``flwr run``, ``flwr supernode register``,
``flwr ls``) and the Runtime API (its own SuperExec) over one HTTPS port, and the Control API has no
authentication of its own: anyone who reaches that port could register a node key of their own, list
the nodes or submit a run. ``fedpers server`` therefore binds the SuperLink to loopback only and puts
this gateway on the public address: it terminates TLS with the same certificate, forwards requests under
``/v1/fleet/`` to the SuperLink (verifying it with the CA) and answers everything else with 403. Node
authentication is untouched: the SuperNode's signed headers pass through as they are.

Run as ``python -m server.gateway --listen HOST:PORT --upstream HOST:PORT [--certs DIR | --insecure]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from common.launch import check_address

FLEET_PREFIX = "/v1/fleet/"
# Connection-level headers a proxy must not forward (RFC 9110 §7.6.1), and the ones it recomputes.
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
log = logging.getLogger("fedpers.gateway")


def _forwardable(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in _HOP]


def make_gateway(upstream: str, ca: Path | None, timeout: float = 120.0) -> Starlette:
    """An ASGI app forwarding ``/v1/fleet/*`` to ``upstream`` (HOST:PORT; TLS verified with ``ca``)."""
    host, port = check_address(upstream)
    scheme = "https" if ca is not None else "http"
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca is not None else False
    client = httpx.AsyncClient(base_url=f"{scheme}://{host}:{port}", verify=verify, timeout=timeout)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not path.startswith(FLEET_PREFIX):
            log.warning("refused %s %s from %s", request.method, path, request.client)
            return Response("only the Fleet API is served on this port\n", status_code=403)
        upstream_request = client.build_request(
            request.method,
            path,
            params=request.url.query or None,
            headers=_forwardable(request.headers.items()),
            content=await request.body(),
        )
        try:
            reply = await client.send(upstream_request)
        except httpx.HTTPError as exc:
            log.warning("SuperLink unreachable behind the gateway: %s", exc)
            return Response("the SuperLink is not available\n", status_code=503)
        return Response(reply.content, reply.status_code, headers=dict(_forwardable(reply.headers.items())))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    """Serve the gateway until SIGINT/SIGTERM."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m server.gateway", description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT devices dial")
    parser.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    parser.add_argument("--certs", type=Path, help="folder with ca.crt, server.pem, server.key")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP on both sides (tests only)")
    args = parser.parse_args(argv)
    if bool(args.certs) == bool(args.insecure):
        parser.error("give exactly one of --certs and --insecure")
    host, port = check_address(args.listen)
    ca = args.certs / "ca.crt" if args.certs else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [gateway] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request otherwise
    uvicorn.run(
        make_gateway(args.upstream, ca),
        host=host.strip("[]"),
        port=port,
        log_level="warning",
        ssl_certfile=str(args.certs / "server.pem") if args.certs else None,
        ssl_keyfile=str(args.certs / "server.key") if args.certs else None,
    )


if __name__ == "__main__":
    main()
