import signal

from pipeline import cli


def test_no_command_prints_usage_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "usage: hiddenstate COMMAND" in capsys.readouterr().out


def test_help_lists_the_kafka_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "kafka" in capsys.readouterr().out


def test_unknown_command_is_refused_with_usage(capsys):
    assert cli.main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_a_stop_during_start_up_ends_the_process_at_once_with_exit_code_0(monkeypatch, capsys):
    codes: list[int] = []
    monkeypatch.setattr(cli.os, "_exit", codes.append)

    cli._stop_before_serving(signal.SIGTERM, None)

    assert codes == [0]
    assert capsys.readouterr().err == "hiddenstate serve: SIGTERM during start-up: stopped\n"
