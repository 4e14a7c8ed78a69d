"""bench_hops: a request's hops from the server's mark files, matched to the client's spans."""
from tests.bench.bench_module import load_bench


def test_each_span_takes_the_first_marks_inside_it_and_the_hops_are_their_differences(tmp_path):
    bench = load_bench("bench_hops")
    # two requests, one at a time; the frontend and the engine write their own files, out of order within each
    frontend = {"fe.http_in": [1_100, 11_100], "fe.add_sent": [1_300, 11_200], "fe.finish_in": [5_000, 14_000],
                "fe.http_out": [5_200, 14_400]}
    engine = {"en.recv": [11_300, 1_400], "en.finish": [4_800, 13_800], "en.sent": [4_900, 13_900]}
    for name, marks in (("1", frontend), ("2", engine)):
        lines = [f"{hop} {ns}" for hop, times in marks.items() for ns in times]
        (tmp_path / f"hops-{name}.txt").write_text("\n".join(reversed(lines)) + "\n")
    (tmp_path / "hops-3.txt").write_text("fe.http_in 20000\n")  # a mark outside every span is not counted
    hops = bench.hop_times(str(tmp_path), [(1_000, 5_500), (11_000, 14_600)])
    us = 1e-3
    assert hops["client sent -> fe.http_in"] == 100 * us
    assert hops["fe.add_sent -> en.recv"] == 100 * us
    assert hops["en.recv -> en.finish"] == (3_400 + 2_500) / 2 * us
    assert hops["fe.http_out -> cl.recv"] == (300 + 200) / 2 * us
    assert list(hops) == ["client sent -> fe.http_in", "fe.http_in -> fe.add_sent", "fe.add_sent -> en.recv",
                          "en.recv -> en.finish", "en.finish -> en.sent", "en.sent -> fe.finish_in",
                          "fe.finish_in -> fe.http_out", "fe.http_out -> cl.recv"]
