"""Local runs side by side must not share a port: Serve's HAProxy mode has fixed default ports, and
some of its listeners bind with SO_REUSEPORT, where a shared port silently mixes two Rays' traffic."""

from tools import serve_local

# Ray 2.60's Serve settings that name a port its HAProxy mode listens on.
PORT_SETTINGS = ["RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
                 "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"]


def test_every_port_setting_is_one_ray_2_60_reads():
    """If Ray renames one, setting it here would do nothing: fail, and name it."""
    import ray.serve._private.constants as constants

    source = open(constants.__file__).read()
    assert [name for name in PORT_SETTINGS if f'"{name}"' not in source] == []


def test_two_local_runs_get_distinct_ports_for_every_serve_listener():
    first, second = (serve_local.LocalServe({"http_options": {"port": 8000}, "applications": []}) for _ in range(2))
    assert first.haproxy and second.haproxy, "the chart's default ingress is HAProxy"
    for name in PORT_SETTINGS:
        assert name in first.ingress_env and name in second.ingress_env, name
    ports = [int(run.ingress_env[name]) for run in (first, second) for name in PORT_SETTINGS]
    assert len(set(ports)) == len(ports), dict(zip(PORT_SETTINGS * 2, ports))


def test_direct_ingress_ports_lie_below_the_kernels_ephemeral_range():
    """Client connections take ephemeral ports; a block inside that range is often not wholly
    free after a few thousand test requests (a CI run found no free block at 40000-40999)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        ephemeral_low = int(ranges.read().split()[0])
    env = serve_local.direct_ingress_ports()
    low, high = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"])
    assert high < ephemeral_low, env
    http = range(low, int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) + 1)
    grpc = range(int(env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"]), high + 1)
    assert not set(http) & set(grpc), env


def test_a_port_in_time_wait_counts_as_free_for_a_server():
    """A closed connection leaves its port in TIME_WAIT for a minute. Serve's replicas bind with
    SO_REUSEADDR, so such a port is theirs to take; only a listener makes it busy."""
    import socket

    port = serve_local.free_port()
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert not serve_local._can_bind(port, reuse=True)  # a listener holds it
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the side that closes first keeps the TIME_WAIT
        client.close()
    assert not serve_local._can_bind(port), "expected the port in TIME_WAIT for a plain bind"
    assert serve_local._can_bind(port, reuse=True)
