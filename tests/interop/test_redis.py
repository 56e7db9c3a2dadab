"""redis_fixture gives a test its own real redis-server, answering on a free port, and stops it."""

from redis_fixture import answers_ping, redis_server, running_redis  # noqa: F401 (redis_server: a fixture)


def test_redis_server_fixture_answers(redis_server):  # noqa: F811
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.command("PING") == b"+PONG\r\n"
    assert redis_server.command("INCR", "admitted") == b":1\r\n"
    assert redis_server.command("INCR", "admitted") == b":2\r\n"


def test_running_redis_stops_its_server(tmp_path):
    with running_redis(tmp_path) as redis:
        assert answers_ping(redis.port)
    assert redis.proc.returncode == 0, redis.log.read_text()
    assert not answers_ping(redis.port)
