"""Zip ``visualization/bundle/`` into the asset bundle Superset imports (``POST /api/v1/assets/import/``).

The YAML files are Superset's own export format with two additions, filled in here from the configuration:

- ``{{ mongo_sqlalchemy_uri }}``, ``{{ collections.<name> }}``, ``{{ rollups.<level>_grain|rule }}`` and
  ``{{ router.notify_min_flagged|critical_ratio }}`` placeholders (the database URI, the collection names of
  ``cfg.mongo.collections``, each roll-up's bucket width as a Superset time grain and a pandas resample rule, which
  incidents the router pages). Superset's own Jinja (``{{ filter_values(...)|... }}``,
  ``{% if %}``) is left for Superset: it is not a plain dotted name;
- a dashboard's ``layout``: rows of ``{chart file name: width}`` with a ``height`` (or ``tabs``, each a ``title``
  and a ``layout``), expanded into the ``position`` tree Superset stores (ROOT > GRID > ROW > CHART, or
  ROOT > TABS > TAB > ROW > CHART), so a layout stays readable and UUIDs stay written once, in the chart files.
"""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml

from config import Config

BUNDLE_DIR = Path(__file__).resolve().parent / "bundle"
ARCHIVE_ROOT = "flead_dashboards"
LEVELS = ("fleet", "device", "metric", "daily")  # roll-up widths ``rollups.<level>_bucket_s``
PLACEHOLDER = re.compile(r"\{\{\s*([\w.]+)\s*\}\}")


def mongo_sqlalchemy_uri(cfg: Config) -> str:
    """The pymongosql URI of the FLEAD database: ``cfg.mongo_uri`` with the database path and ``mode=superset``."""
    parts = urlsplit(cfg.mongo_uri)
    query = [(key, value) for key, value in parse_qsl(parts.query) if key != "mode"] + [("mode", "superset")]
    return urlunsplit((parts.scheme, parts.netloc, "/" + cfg.mongo.database, urlencode(query), ""))


def rollup_grains(cfg: Config) -> dict[str, int]:
    """Superset time grain (ISO 8601 duration) -> seconds, one per roll-up bucket width: charts of a roll-up group
    by its own bucket width (superset_server adds these grains to the MongoDB engine)."""
    widths = [cfg.rollups[f"{level}_bucket_s"] for level in LEVELS]
    return {f"PT{seconds}S": seconds for seconds in widths}


def _placeholder_values(cfg: Config) -> dict[str, str]:
    values = {"mongo_sqlalchemy_uri": mongo_sqlalchemy_uri(cfg)}
    values.update({f"collections.{key}": name for key, name in cfg.mongo.collections.to_dict().items()})
    for level in LEVELS:  # e.g. rollups.fleet_grain: PT600S, rollups.fleet_rule: 600s
        seconds = cfg.rollups[f"{level}_bucket_s"]
        values[f"rollups.{level}_grain"] = f"PT{seconds}S"
        values[f"rollups.{level}_rule"] = f"{seconds}s"  # pandas resample rule: empty buckets become gaps
    for name in ("notify_min_flagged", "critical_ratio"):  # which incidents page (the incidents' "paged" column)
        values[f"router.{name}"] = repr(cfg.router[name])
    return values


def _fill(text: str, values: dict[str, str], source: Path) -> str:
    def replace(match: re.Match) -> str:
        try:
            return values[match.group(1)]
        except KeyError:
            raise ValueError(f"{source}: unknown placeholder {match.group(0)} "
                             f"(known: {', '.join(sorted(values))})") from None

    return PLACEHOLDER.sub(replace, text)


def _add_rows(position: dict, rows: list[dict], parents: list[str], charts: dict[str, dict], source: Path,
              prefix: str) -> list[str]:
    """Add ROW and CHART items for `rows` under `parents` (ROOT_ID first, the direct parent last); the row ids."""
    row_ids = []
    for row_number, row in enumerate(rows, start=1):
        row_id = f"ROW-{prefix}{row_number}"
        row_ids.append(row_id)
        position[row_id] = {"type": "ROW", "id": row_id, "children": [], "parents": parents,
                            "meta": {"background": "BACKGROUND_TRANSPARENT"}}
        for name, width in row["charts"].items():
            if name not in charts:
                raise ValueError(f"{source}: layout names chart {name!r}, but charts/{name}.yaml does not exist")
            chart_id = f"CHART-{name}"
            position[row_id]["children"].append(chart_id)
            position[chart_id] = {
                "type": "CHART", "id": chart_id, "children": [], "parents": parents + [row_id],
                # chartId is a placeholder: the import maps it to the chart's id through the uuid.
                "meta": {"chartId": len(position), "uuid": charts[name]["uuid"],
                         "sliceName": charts[name]["slice_name"], "width": width, "height": row["height"]}}
    return row_ids


def _position(dashboard: dict, charts: dict[str, dict], source: Path) -> dict:
    """Superset's dashboard ``position`` tree: ROOT > GRID > ROW > CHART for a ``layout`` (rows of charts), or
    ROOT > TABS > TAB > ROW > CHART for ``tabs`` (each ``{title, layout}``; Superset draws the charts of a tab only
    when it is opened, so the first tab is what a first load costs)."""
    position: dict = {
        "DASHBOARD_VERSION_KEY": "v2",
        "ROOT_ID": {"type": "ROOT", "id": "ROOT_ID", "children": []},
        "HEADER_ID": {"type": "HEADER", "id": "HEADER_ID", "meta": {"text": dashboard["dashboard_title"]}},
    }
    if "tabs" not in dashboard:
        position["ROOT_ID"]["children"].append("GRID_ID")
        position["GRID_ID"] = {"type": "GRID", "id": "GRID_ID", "children": [], "parents": ["ROOT_ID"]}
        position["GRID_ID"]["children"] = _add_rows(position, dashboard["layout"], ["ROOT_ID", "GRID_ID"], charts,
                                                    source, "")
        return position
    position["ROOT_ID"]["children"].append("TABS_ID")
    position["TABS_ID"] = {"type": "TABS", "id": "TABS_ID", "children": [], "parents": ["ROOT_ID"], "meta": {}}
    for tab_number, tab in enumerate(dashboard["tabs"], start=1):
        tab_id = f"TAB-{tab_number}"
        position["TABS_ID"]["children"].append(tab_id)
        position[tab_id] = {"type": "TAB", "id": tab_id, "parents": ["ROOT_ID", "TABS_ID"],
                            "meta": {"text": tab["title"]}}
        position[tab_id]["children"] = _add_rows(position, tab["layout"], ["ROOT_ID", "TABS_ID", tab_id], charts,
                                                 source, f"{tab_number}-")
    return position


def bundle_files(cfg: Config, bundle_dir: Path = BUNDLE_DIR) -> dict[str, str]:
    """Relative path -> YAML text of every file of the bundle, placeholders filled and layouts expanded."""
    values = _placeholder_values(cfg)
    texts = {str(path.relative_to(bundle_dir)): _fill(path.read_text(), values, path)
             for path in sorted(bundle_dir.rglob("*.yaml"))}
    charts = {Path(rel).stem: yaml.safe_load(text) for rel, text in texts.items() if rel.startswith("charts/")}
    for rel in [rel for rel in texts if rel.startswith("dashboards/")]:
        dashboard = yaml.safe_load(texts[rel])
        dashboard["position"] = _position(dashboard, charts, bundle_dir / rel)
        dashboard.pop("layout", None)
        dashboard.pop("tabs", None)
        texts[rel] = yaml.safe_dump(dashboard, sort_keys=False)
    return texts


def build_bundle_zip(cfg: Config, bundle_dir: Path = BUNDLE_DIR) -> bytes:
    """The bundle as ZIP bytes, ready for ``/api/v1/assets/import/``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel, text in bundle_files(cfg, bundle_dir).items():
            archive.writestr(f"{ARCHIVE_ROOT}/{rel}", text)
    return buffer.getvalue()
