"""Schema-driven fuzzing of openapi.yaml with schemathesis: no 5xx, and every response (status,
content type, body) matches the spec."""
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import API_KEY, ROOT


def test_openapi_fuzz(smol, tmp_path):
    # The spec cannot know the served model's name; pin `model` to it so that generated requests
    # reach generation instead of stopping at 404.
    spec = (ROOT / "openapi.yaml").read_text()
    pinned = spec.replace("            model: {type: string}", f"            model: {{type: string, enum: [{smol.name}]}}")
    assert pinned != spec
    (tmp_path / "openapi.yaml").write_text(pinned)
    st = Path(sys.executable).with_name("st")
    cmd = [
        str(st), "run", str(tmp_path / "openapi.yaml"), "--url", smol.base,
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                    "response_schema_conformance,negative_data_rejection",
        "--header", f"Authorization: Bearer {API_KEY}",
        "--max-examples", os.environ.get("INFERD_FUZZ_EXAMPLES", "50"),
        "--seed", "1", "--workers", "1", "--request-timeout", "60",
        "--report", "junit,har", "--report-dir", str(tmp_path),
        "--report-har-path", str(tmp_path / "run.har"),
    ]
    timeout = int(os.environ.get("INFERD_FUZZ_TIMEOUT", "1200"))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    print(out.stdout[-6000:])
    print(out.stderr[-3000:])
    assert out.returncode == 0, "schemathesis found failures (output above)"
    import xml.etree.ElementTree as ET
    reports = list(tmp_path.glob("*.xml"))
    assert reports, "schemathesis wrote no report"
    import yaml
    paths = yaml.safe_load(spec)["paths"].values()
    operations = sum(1 for ops in paths for m in ops if m in ("get", "post", "put", "delete", "patch"))
    cases = ET.parse(reports[0]).getroot().iter("testcase")
    assert sum(1 for _ in cases) == operations, "every operation was exercised"
    # Every answer the daemon gave, by route and status (the README quotes a large run's).
    import collections
    import json
    har = json.loads((tmp_path / "run.har").read_text())
    tally = collections.Counter(
        (e["request"]["method"] + " " + re.sub(r"^https?://[^/]+", "", e["request"]["url"]).split("?")[0],
         e["response"]["status"])
        for e in har["log"]["entries"])
    print(f"{sum(tally.values())} requests:")
    for (route, status), n in sorted(tally.items()):
        print(f"  {route} {status}: {n}")
    assert not [k for k in tally if k[1] >= 500], "a 5xx in the tally"
    generated = int(re.search(r"(\d+) generated,", out.stdout).group(1))
    assert generated >= 300, f"only {generated} requests were generated"
