from __future__ import annotations

import pytest

from spine_node.node.config import Route, RouteMatch, default_routes
from spine_node.node.route import SeriesFacts, matches, plan

CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def facts(uid: str, modality: str, body: str = "", view: str = "", sop: str = CT) -> SeriesFacts:
    return SeriesFacts("1.2.3", uid, modality, body, view, sop)


@pytest.mark.parametrize(
    "match, series, expected",
    [
        (RouteMatch(modality=["CT"]), facts("1", "ct"), True),  # case-insensitive
        (RouteMatch(modality=["CT"]), facts("1", "MR"), False),
        (RouteMatch(body_part=["*SPINE*"]), facts("1", "CT", "CSPINE"), True),
        (RouteMatch(body_part=["*SPINE*"]), facts("1", "CT", "CHEST"), False),
        (RouteMatch(body_part=[""]), facts("1", "CT", ""), True),  # "" matches a missing value
        (RouteMatch(body_part=["CSPINE"]), facts("1", "CT", ""), False),
        (RouteMatch(view_position=["LAT*"]), facts("1", "DX", "SPINE", "LATERAL"), True),
        (RouteMatch(sop_class_uid=[DX]), facts("1", "DX", sop=CT), False),
        (RouteMatch(), facts("1", "anything"), True),
    ],
)
def test_matches(match, series, expected):
    assert matches(match, series) is expected


def test_series_scope_one_job_per_series_and_pipeline():
    routes = [Route(name="ct", match=RouteMatch(modality=["CT"]), pipelines=["a", "b"])]
    jobs = plan(routes, [facts("1", "CT"), facts("2", "CT"), facts("3", "MR")])
    assert [(j.pipeline, j.series_uids) for j in jobs] == [
        ("a", ("1",)), ("b", ("1",)), ("a", ("2",)), ("b", ("2",))]


def test_study_scope_takes_every_matching_series_of_the_study():
    routes = [Route(name="pair", match=RouteMatch(modality=["DX"]), pipelines=["pair"], scope="study")]
    earlier = facts("9", "DX", "SPINE", "AP", DX)
    new = facts("5", "DX", "SPINE", "LL", DX)
    jobs = plan(routes, [new], [earlier, new, facts("7", "CT")])
    assert len(jobs) == 1 and jobs[0].series_uids == ("5", "9") and jobs[0].key_series_uid == "5"
    assert plan(routes, [facts("7", "CT")], [earlier, facts("7", "CT")]) == []


def test_default_routes_send_cspine_ct_and_spine_radiographs_to_pipelines():
    routes = default_routes()
    ct = {j.pipeline for j in plan(routes, [facts("1", "CT", "CSPINE")])}
    assert ct == {"ct-cspine-fracture"}
    dx = {j.pipeline for j in plan(routes, [facts("2", "DX", "CSPINE", "LL", DX)])}
    assert {"xray-fracture", "xray-spine-seg", "xray-tissue-seg", "xray-cspine-classify",
            "xray-pair-classify"} == dx
    assert plan(routes, [facts("3", "CT", "CHEST")]) == []
    assert plan(routes, [facts("4", "MR", "CSPINE")]) == []
