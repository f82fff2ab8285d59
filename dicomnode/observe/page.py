"""The status page and a job's page as HTML (PURE: values in, text out).

What a PACS administrator looks at: the listener (address, associations open, free disk, the
last instance received), then the jobs, newest first, with their state, reason and stage times,
each linking to its page (journal, audit rows, a Retry button when a person can help). The
list page reloads itself every few seconds. Patients are shown as initials and a short keyed
hash unless the viewer is authorised (:class:`PatientLabel`); everything is escaped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dicomnode import __version__
from dicomnode.jobs.machine import JobState

#: Seconds between reloads of the list page.
REFRESH_SECONDS = 3

#: States a person can send back to the queue (``dicomnode retry`` does the same).
RETRYABLE = (JobState.FAILED.value, JobState.RETRY_WAIT.value)

_STATE_COLOURS = {
    "pending": "#5b6b7f", "running": "#1f6feb", "delivering": "#8250df",
    "retry_wait": "#bf8700", "delivered": "#1a7f37", "failed": "#cf222e",
}


@dataclass(frozen=True)
class PatientLabel:
    """How a job's patient is shown: ``name`` and ``patient_id`` only to an authorised
    viewer, else initials and a hash that tells patients apart without naming them."""

    initials: str
    hash: str
    name: str = ""
    patient_id: str = ""

    def shown(self, authorised: bool) -> str:
        if authorised and (self.name or self.patient_id):
            return ", ".join(part for part in (self.name, self.patient_id and f"ID {self.patient_id}")
                             if part)
        return f"{self.initials or '?'} #{self.hash}" if self.hash else "unknown"


@dataclass(frozen=True)
class JobRow:
    id: str
    state: str
    reason: str
    created_at: float
    updated_at: float
    instances: int
    series_uid: str
    study_uid: str
    patient: PatientLabel
    seconds: Mapping[str, float]
    attempts: int
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ListenerState:
    ae_title: str
    address: str
    tls: bool
    associations_open: int
    spool_free_bytes: int
    last_instance_at: float | None


@dataclass(frozen=True)
class JournalRow:
    at: float
    from_state: str
    to_state: str
    reason: str


@dataclass(frozen=True)
class AuditRow:
    at: float
    event: str
    actor: str
    destination: str
    detail: str


def status_page(listener: ListenerState, jobs: Sequence[JobRow], counts: Mapping[str, int], *,
                authorised: bool, now: float) -> str:
    """The front page: the listener, job counts by state, then the jobs."""
    rows = "\n".join(_job_row(job, authorised) for job in jobs) or (
        '<tr><td colspan="7" class="empty">no jobs yet: send a CT series to '
        f'{_e(listener.ae_title)} at {_e(listener.address)}</td></tr>')
    badges = " ".join(f'{_badge(state)} {count}' for state, count in counts.items())
    last = (f"{_ago(now - listener.last_instance_at)} ago ({_time(listener.last_instance_at)})"
            if listener.last_instance_at else "none since the node started")
    body = f"""
<section class="listener" id="listener">
  <h2>Listener</h2>
  <dl>
    <dt>AE title</dt><dd>{_e(listener.ae_title)}</dd>
    <dt>Address</dt><dd>{_e(listener.address)}{' (DICOM TLS)' if listener.tls else ''}</dd>
    <dt>Associations open</dt><dd id="associations-open">{listener.associations_open}</dd>
    <dt>Free spool disk</dt><dd>{listener.spool_free_bytes / 2**30:.1f} GB</dd>
    <dt>Last instance received</dt><dd id="last-instance">{last}</dd>
  </dl>
</section>
<section>
  <h2>Jobs</h2>
  <p class="counts">{badges}</p>
  <table id="jobs">
    <thead><tr><th>Job</th><th>State</th><th>Patient</th><th>Instances</th><th>Updated</th>
    <th>Stage times</th><th>Reason</th></tr></thead>
    <tbody>
{rows}
    </tbody>
  </table>
</section>"""
    return _page("dicomnode status", body, refresh=True,
                 note="" if authorised else "Patients are shown as initials and a hash; "
                 "sign in to see names.")


def job_page(job: JobRow, journal: Sequence[JournalRow], audit: Sequence[AuditRow], *,
             authorised: bool, retry_token: str) -> str:
    """One job: its facts, the Retry button when it is failed or waiting, its journal and
    its audit rows."""
    retry = ""
    if job.state in RETRYABLE:
        retry = f"""
<form method="post" action="/jobs/{_e(job.id)}/retry">
  <input type="hidden" name="token" value="{_e(retry_token)}">
  <button type="submit" id="retry">Retry</button>
  <span class="hint">analyses the series again (as <code>dicomnode retry {_e(job.id)}</code>)</span>
</form>"""
    warnings = "".join(f"<li>{_e(w)}</li>" for w in job.warnings)
    journal_rows = "\n".join(
        f"<tr><td>{_time(e.at)}</td><td>{_e(e.from_state or '-')}</td><td>{_badge(e.to_state)}</td>"
        f"<td>{_e(e.reason)}</td></tr>" for e in journal)
    audit_rows = "\n".join(
        f"<tr><td>{_time(a.at)}</td><td>{_e(a.event)}</td><td>{_e(a.actor)}</td>"
        f"<td>{_e(a.destination)}</td><td>{_e(a.detail)}</td></tr>" for a in audit)
    body = f"""
<p><a href="/">&larr; all jobs</a></p>
<h2>Job <code>{_e(job.id)}</code> {_badge(job.state)}</h2>
<p class="reason" id="reason">{_e(job.reason)}</p>{retry}
<dl>
  <dt>Patient</dt><dd>{_e(job.patient.shown(authorised))}</dd>
  <dt>Study UID</dt><dd><code>{_e(job.study_uid)}</code></dd>
  <dt>Series UID</dt><dd><code>{_e(job.series_uid)}</code></dd>
  <dt>Instances</dt><dd>{job.instances}</dd>
  <dt>Created</dt><dd>{_time(job.created_at)}</dd>
  <dt>Failed deliveries</dt><dd>{job.attempts}</dd>
  <dt>Stage times</dt><dd>{_e(_stages(job.seconds)) or '-'}</dd>
</dl>
{f'<h3>Warnings</h3><ul>{warnings}</ul>' if warnings else ''}
<h3>Journal</h3>
<table id="journal"><thead><tr><th>When</th><th>From</th><th>To</th><th>Reason</th></tr></thead>
<tbody>
{journal_rows}
</tbody></table>
<h3>Audit trail</h3>
<table id="audit"><thead><tr><th>When</th><th>Event</th><th>Who</th><th>Destination</th>
<th>Detail</th></tr></thead>
<tbody>
{audit_rows}
</tbody></table>"""
    return _page(f"dicomnode job {job.id}", body, refresh=False, note="")


def _job_row(job: JobRow, authorised: bool) -> str:
    return (f'<tr class="job" data-job="{_e(job.id)}" data-state="{_e(job.state)}">'
            f'<td><a href="/jobs/{_e(job.id)}"><code>{_e(job.id)}</code></a></td>'
            f"<td>{_badge(job.state)}</td><td>{_e(job.patient.shown(authorised))}</td>"
            f"<td>{job.instances}</td><td>{_time(job.updated_at)}</td>"
            f"<td>{_e(_stages(job.seconds))}</td><td>{_e(job.reason)}</td></tr>")


def _badge(state: str) -> str:
    colour = _STATE_COLOURS.get(state, "#57606a")
    return f'<span class="state" style="background:{colour}">{_e(state)}</span>'


def _stages(seconds: Mapping[str, float]) -> str:
    return ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items())


def _time(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em 2em; color: #1f2328; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.15em; margin-top: 1.2em; }
.caption { color: #9a6700; font-weight: 600; } .note { color: #57606a; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dt { color: #57606a; } dd { margin: 0; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #d0d7de; vertical-align: top; }
th { color: #57606a; font-weight: 600; }
.state { color: white; border-radius: 1em; padding: .05em .6em; font-size: .9em; }
.empty { color: #57606a; font-style: italic; }
button { font-size: 1em; padding: .3em 1.2em; } .hint { color: #57606a; margin-left: .6em; }
"""


def _page(title: str, body: str, *, refresh: bool, note: str) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{meta}<link rel="icon" href="data:,">
<title>{_e(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>dicomnode <small class="note">{_e(__version__)}</small></h1>
<p class="caption">Research predictions from imaging, not for clinical decisions.</p>
{f'<p class="note">{_e(note)}</p>' if note else ''}
{body}
</body></html>
"""
