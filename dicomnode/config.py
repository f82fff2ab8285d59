"""The node's configuration: one typed schema, loaded from a TOML file in ``listeners/``.

Precedence: command-line options > environment variables > TOML file > defaults here. Every
key may be overridden by an environment variable named ``DICOMNODE_<SECTION>__<KEY>`` (e.g.
``DICOMNODE_NODE__PORT=11113``). Secrets are never written in the TOML: a destination names
the environment variable or file that holds them. Defaults live in this module only.
Relative paths in a TOML file are resolved against the project home (see :func:`home`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import sys
import tomllib
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dicomnode.errors import ConfigError

ENV_PREFIX = "DICOMNODE_"


def home() -> Path:
    """The folder that holds ``models/``, ``listeners/`` and ``sr_templates/``.

    Looked up in order: ``$DICOMNODE_HOME``; the source checkout this package runs from;
    ``<prefix>/share/dicomnode`` where ``pip install .`` puts them.
    """
    env = os.environ.get("DICOMNODE_HOME")
    if env:
        return Path(env).resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "models").is_dir() and (checkout / "sr_templates").is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "dicomnode"


@dataclass(frozen=True)
class TlsServerSettings:
    """The TLS options of a server the node runs: the DICOM listener (``[node]``) and the
    status page (``[http]``) take the same keys."""

    #: TLS (BCP 195): the server's certificate (PEM, may be followed by its intermediate CAs)
    #: and its private key (PEM). Both set: every connection must start with a TLS handshake
    #: and plain TCP is refused; neither: plain TCP. Relative paths resolve against the home.
    #: The files are checked at start-up.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: Password of an encrypted private key, read from this environment variable or file at
    #: start-up (secrets are never written in the TOML).
    tls_key_password_env: str = ""
    tls_key_password_file: str = ""
    #: CA bundle (PEM) that client certificates must chain to. When set, a client that
    #: presents a certificate not signed by it is refused during the handshake.
    tls_ca_file: str = ""
    #: Refuse, during the handshake, clients without a certificate signed by ``tls_ca_file``.
    tls_require_client_cert: bool = False
    #: Lowest TLS version accepted (BCP 195: TLS 1.2 or later).
    tls_min_version: Literal["1.2", "1.3"] = "1.2"

    @property
    def tls(self) -> bool:
        """Whether the server speaks TLS."""
        return bool(self.tls_cert_file and self.tls_key_file)

    def _check_tls(self, section: str) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            missing = "tls_key_file" if self.tls_cert_file else "tls_cert_file"
            raise ConfigError(
                f"{section}.{missing}: TLS needs both tls_cert_file and tls_key_file (or neither)"
            )
        for key in ("tls_ca_file", "tls_key_password_env", "tls_key_password_file"):
            if getattr(self, key) and not self.tls:
                raise ConfigError(f"{section}.{key}: set only with tls_cert_file and tls_key_file")
        if self.tls_require_client_cert and not self.tls_ca_file:
            raise ConfigError(
                f"{section}.tls_require_client_cert: needs tls_ca_file, the CA that signs the "
                "client certificates"
            )
        if self.tls_key_password_env and self.tls_key_password_file:
            raise ConfigError(
                f"{section}.tls_key_password_env: give tls_key_password_env or "
                "tls_key_password_file, not both"
            )


@dataclass(frozen=True)
class NodeConfig(TlsServerSettings):
    """Network identity of the listener (its TLS keys: :class:`TlsServerSettings`; DICOM TLS,
    PS3.15 B.12)."""

    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    data_dir: Path = Path("var/dicomnode")
    #: What to do with storage requests that are not CT: "reject" negotiates only the CT
    #: storage SOP classes, so the SCP rejects any other presentation context during
    #: association negotiation (PS3.8 9.3.3.2: abstract syntax not supported) and no C-STORE
    #: for it can arrive; "accept" stores them in the spool but never routes them.
    non_ct: Literal["reject", "accept"] = "reject"
    #: Largest P-DATA PDU (bytes) the node accepts, announced as its Maximum Length (PS3.8
    #: D.1). A PDU is read whole into memory, so this bounds what one connection holds; a peer
    #: that sends a longer PDU is disconnected. 4096 to 16 MiB.
    max_pdu: int = 1048576
    #: Refuse associations whose Called AE Title is not ``ae_title``: A-ASSOCIATE-RJ
    #: rejected-permanent, reason 7 "called-AE-title-not-recognized" (PS3.8 9.3.4).
    require_called_ae: bool = True
    #: Calling AE Titles allowed to associate; empty allows any. Others get A-ASSOCIATE-RJ
    #: rejected-permanent, reason 3 "calling-AE-title-not-recognized". An AE title is not
    #: authentication: on an untrusted network, add TLS with client certificates.
    allowed_calling_aes: tuple[str, ...] = ()
    #: Below this much free space (MB) on the spool's file system, C-STORE is answered
    #: 0xA700 Out of Resources (and logged) instead of filling the disk; storing resumes by
    #: itself once space is freed. 0 turns the check off.
    min_free_mb: float = 1024.0
    #: Associations served at once (negotiated, all hosts), and from one calling host. More
    #: are refused with A-ASSOCIATE-RJ rejected-transient, reason "local limit exceeded".
    max_associations: int = 20
    max_associations_per_host: int = 10
    #: Connections that have not yet sent a whole A-ASSOCIATE-RQ, from one host and in all.
    #: A new connection over either limit closes the oldest such connection (of that host,
    #: or overall), so connections that stall before negotiating cannot lock senders out.
    max_pending_per_host: int = 8
    max_pending_connections: int = 64
    #: Deadlines (seconds): from connecting (after the TLS handshake) to a whole
    #: A-ASSOCIATE-RQ; from a PDU's first byte to its last; from a data set's first fragment
    #: to its last; silence between PDUs of an association. Past one, the connection is
    #: closed (A-ABORT once associated) and the reason logged.
    association_request_seconds: float = 10.0
    pdu_seconds: float = 30.0
    data_set_seconds: float = 600.0
    idle_seconds: float = 60.0
    #: Largest instance (MB, as received) stored; a larger one is not held in memory (data
    #: sets are streamed to the spool's disk as they arrive) and is answered 0xA700.
    max_instance_mb: float = 256.0
    #: Largest inflated size (MB) of a Deflated Explicit VR Little Endian data set (a deflate
    #: bomb of 0.5 MB can inflate to gigabytes); larger ones are answered 0xA700.
    max_inflated_mb: float = 256.0
    #: Group that may read the node's files (a service account's group). Empty: files are
    #: 0600 and folders 0700, owner only; set: 0640 and 0750 (setgid), owned by that group.
    file_group: str = ""

    def __post_init__(self) -> None:
        self._check_limits()
        self._check_tls("node")

    def _check_limits(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"node.port: must lie in 0..65535 (0: any free port), got {self.port}")
        if not 4096 <= self.max_pdu <= 16 * 2**20:
            raise ConfigError(f"node.max_pdu: must lie in 4096..16777216 bytes, got {self.max_pdu}")
        for key in ("max_associations", "max_associations_per_host", "max_pending_per_host",
                    "max_pending_connections"):
            if getattr(self, key) < 1:
                raise ConfigError(f"node.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("association_request_seconds", "pdu_seconds", "data_set_seconds",
                    "idle_seconds", "max_instance_mb", "max_inflated_mb"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"node.{key}: must be > 0, got {getattr(self, key)}")
        if self.max_associations_per_host > self.max_associations:
            raise ConfigError(
                f"node.max_associations_per_host: {self.max_associations_per_host} is more "
                f"than node.max_associations ({self.max_associations})")



@dataclass(frozen=True)
class HttpConfig(TlsServerSettings):
    """The status page, Prometheus ``/metrics`` and ``/healthz``, served by ``dicomnode serve``
    beside the listener (:mod:`dicomnode.observe.http`); HTTPS with the same TLS keys as
    ``[node]``.

    Anyone who can reach the address gets ``/healthz``. Everything else needs the credentials
    below when they are set, except from this machine (127.0.0.1), which sees the status
    page with patients as initials and a hash only: names need credentials. Listening beyond
    loopback needs credentials.
    """

    #: Serve the status page at all.
    enabled: bool = True
    #: Address to listen on; 127.0.0.1 keeps it on this machine.
    host: str = "127.0.0.1"
    #: Port (0: any free port, printed at start-up).
    port: int = 11180
    #: A bearer token (``Authorization: Bearer ...``), read at start-up from this environment
    #: variable or file.
    token_env: str = ""
    token_file: str = ""
    #: Basic authentication: a user name and the password's environment variable or file.
    username: str = ""
    password_env: str = ""
    password_file: str = ""

    def __post_init__(self) -> None:
        self._check_tls("http")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"http.port: must lie in 0..65535 (0: any free port), got {self.port}")
        if self.token_env and self.token_file:
            raise ConfigError("http.token_env: give token_env or token_file, not both")
        if self.password_env and self.password_file:
            raise ConfigError("http.password_env: give password_env or password_file, not both")
        if bool(self.username) != bool(self.password_env or self.password_file):
            raise ConfigError("http.username: basic authentication needs username and "
                              "password_env or password_file")
        if self.enabled and not self.credentials and not _is_loopback(self.host):
            raise ConfigError(
                f"http.host: {self.host!a} is reachable from other machines, so the status page "
                "needs credentials: set http.token_env or http.token_file (a bearer token), or "
                "http.username with http.password_env or http.password_file")

    @property
    def credentials(self) -> bool:
        """Whether a token or a user and password are configured."""
        return bool(self.token_env or self.token_file or self.username)


@dataclass(frozen=True)
class CompletionConfig:
    """When a series counts as complete (see ``dicomnode.series.completion``)."""

    quiet_seconds: float = 5.0
    #: Extra wait for a stack whose slice positions have a gap.
    gap_timeout_seconds: float = 60.0
    #: After the gap timeout: "fail" the job with the reason, or "warn" (process and carry
    #: the warning into the report).
    gap_policy: Literal["fail", "warn"] = "warn"
    #: Relative tolerance on slice spacing when deciding that a stack is evenly spaced.
    spacing_tolerance: float = 0.1
    #: A series sent again (the same SOP Instance UIDs) after a job covered it: "ignore" it
    #: (PACS re-send whole series after timeouts, and a resend must not make a second result
    #: set), or "reprocess" it as a new job whose SEG and SR carry new UIDs. Instances with
    #: new SOP Instance UIDs always make a new job.
    resent_series: Literal["ignore", "reprocess"] = "ignore"


@dataclass(frozen=True)
class AssemblyConfig:
    min_slices: int = 10
    #: Largest relative deviation of a slice gap from the median gap.
    spacing_tolerance: float = 0.1
    #: Largest angle (degrees) between slice orientations that still counts as one orientation.
    orientation_tolerance_deg: float = 1.0


@dataclass(frozen=True)
class JobsConfig:
    """Limits on the work one job may cause (see ``dicomnode.jobs.runner``)."""

    #: Times a job's analysis is started, counting starts that a crash or kill interrupted;
    #: a job interrupted this often fails with the reason instead of crash-looping the node.
    max_attempts: int = 3
    #: Largest volume (voxels: rows x columns x slices, from the headers) one job analyses;
    #: a larger series fails with the reason before any pixel data is read. A job needs about
    #: 50 bytes a voxel on top of the node's 0.55 GB (benchmarks/job_memory.py): 512^3 voxels,
    #: about 7 GB. Raise it for longer thin-slice series where the memory is there.
    max_voxels: int = 512 * 512 * 512

    def __post_init__(self) -> None:
        for key in ("max_attempts", "max_voxels"):
            if getattr(self, key) < 1:
                raise ConfigError(f"jobs.{key}: must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class RunnerConfig:
    """Where analysis and delivery run (:mod:`dicomnode.jobs`).

    ``"embedded"``: in the node's own process, one job at a time, no server needed.
    ``"celery"``: as Celery tasks on ``dicomnode worker`` processes (one per GPU or CPU
    budget, on this or other machines) through a broker (Redis or RabbitMQ). The node keeps
    receiving, spooling, deciding completion and the job states; a worker claims a job from the
    node over HTTP (``[http]``, which must be enabled), reads the series from the node (or from
    the same spool folder when it can see it), and hands the results and the delivery's outcome
    back. Workers use the same configuration file.
    """

    kind: Literal["embedded", "celery"] = "embedded"
    #: The Celery broker, e.g. "redis://broker:6379/0" or "amqp://user@broker:5672//"; a
    #: password in it is read from ``broker_password_env`` / ``broker_password_file``.
    broker_url: str = "redis://127.0.0.1:6379/0"
    broker_password_env: str = ""
    broker_password_file: str = ""
    #: The queue the node's tasks go to.
    queue: str = "dicomnode"
    #: How workers reach the node's HTTP server; empty: ``[http]`` host and port.
    node_url: str = ""
    #: The secret workers present to the node (a bearer token), from this environment variable
    #: or file: needed with ``kind = "celery"``.
    worker_token_env: str = ""
    worker_token_file: str = ""
    #: Seconds after which a task a worker took and never finished (the worker was killed) is
    #: given to another worker (Redis' visibility timeout): longer than the slowest job.
    redelivery_seconds: float = 1800.0

    def __post_init__(self) -> None:
        if self.kind == "celery" and not (self.worker_token_env or self.worker_token_file):
            raise ConfigError("runner.worker_token_env: celery workers need a token to talk to "
                              "the node: set runner.worker_token_env or runner.worker_token_file")
        if self.worker_token_env and self.worker_token_file:
            raise ConfigError("runner.worker_token_env: give worker_token_env or "
                              "worker_token_file, not both")
        if self.broker_password_env and self.broker_password_file:
            raise ConfigError("runner.broker_password_env: give broker_password_env or "
                              "broker_password_file, not both")
        if not self.redelivery_seconds > 0:
            raise ConfigError(f"runner.redelivery_seconds: must be > 0, got {self.redelivery_seconds}")
        scheme = urllib.parse.urlsplit(self.broker_url).scheme
        if self.kind == "celery" and scheme not in ("redis", "rediss", "amqp", "amqps"):
            raise ConfigError(f"runner.broker_url: a redis:// or amqp:// URL, got scheme {scheme!r}")


@dataclass(frozen=True)
class SegmentationConfig:
    """How lesions are found; the single place for the segmenter's defaults.

    A voxel is lesion where the model's probability reaches ``probability_threshold``; lesions
    are its 3D connected components. A lesion's confidence is the mean probability inside it.
    The false-positive controls below are ours (no paper fixes them); the shipped defaults
    were chosen on the training patients only (``models/segmentation/MODEL_CARD.md``).
    """

    model_dir: Path = Path("models/segmentation")
    #: Where the lesions come from: "model" (always ours), "supplied" (only an RTSTRUCT or SEG
    #: that references the CT: a radiologist's own contours; a CT without one waits for it),
    #: or "auto" (the supplied one when there is one, else the model).
    source: Literal["auto", "model", "supplied"] = "auto"
    #: Another segmenter, as "package.module:factory": ``factory(section, config)`` returns an
    #: object with ``info`` and ``segment(volume) -> LabelVolume``
    #: (:class:`dicomnode.analyse.segment.LesionSource`). Empty: the U-Net in ``model_dir``.
    plugin: str = ""
    #: "auto" picks CUDA when present, else CPU.
    device: str = "auto"
    #: Components smaller than this (ml) are dropped.
    min_lesion_ml: float = 1.0
    probability_threshold: float = 0.5
    #: Components whose mean probability is below this are dropped.
    min_confidence: float = 0.8
    #: Keep at most this many lesions, the most confident first (0: no limit). 1 by default:
    #: the shipped model learnt one gross tumour per patient (every training case has exactly
    #: one), and out of its domain one wrong lesion is better than several.
    max_lesions: int = 1
    #: Look for lesions only inside the body (the largest connected region above -500 HU,
    #: holes filled slice by slice): nothing in the air, on the table or in the blankets.
    body_only: bool = True
    sw_batch_size: int = 2
    overlap: float = 0.25

    def __post_init__(self) -> None:
        for key in ("probability_threshold", "min_confidence"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"segmentation.{key}: must lie in [0, 1), "
                                  f"got {getattr(self, key)}")
        if self.min_lesion_ml < 0:
            raise ConfigError(f"segmentation.min_lesion_ml: must be >= 0, got {self.min_lesion_ml}")
        if self.max_lesions < 0:
            raise ConfigError(f"segmentation.max_lesions: must be >= 0 (0: no limit), "
                              f"got {self.max_lesions}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"segmentation.overlap: must lie in [0, 1), got {self.overlap}")
        if self.sw_batch_size < 1:
            raise ConfigError(f"segmentation.sw_batch_size: must be >= 1, got {self.sw_batch_size}")
        if self.plugin and self.plugin.count(":") != 1:
            raise ConfigError(f"segmentation.plugin: expected 'package.module:factory', "
                              f"got {self.plugin!r}")


#: ``[radiomics] crop_margin_mm`` for the margin that the protocol's filters need.
AUTO_MARGIN = "auto"

#: ``[radiomics] workers = 0`` means one per CPU core, but no more than this: a lesion has 12
#: parts (shape and 11 images), and each worker holds pyradiomics (about 150 MB).
MAX_AUTO_RADIOMICS_WORKERS = 6


@dataclass(frozen=True)
class RadiomicsConfig:
    params_file: Path = Path("models/radiomics/tmb_protocol.yaml")
    #: Crop the image to the lesion's bounding box plus a margin before filtering. "auto"
    #: (ours; the paper does not say how it cropped): the margin the protocol's filters need
    #: for every feature to equal pyradiomics' whole-image value within 1e-9 relative; 0: the
    #: whole image, bit-identical to pyradiomics (15 s and 2.3 GB per lesion on a 512x512x48
    #: CT); a number: a fixed margin in mm. See models/radiomics/README.md.
    crop_margin_mm: str = AUTO_MARGIN
    #: Processes computing a lesion's 11 images in parallel; 0: one per CPU core (at most
    #: MAX_AUTO_RADIOMICS_WORKERS); 1: in the node's own process. Values do not depend on it.
    workers: int = 0

    def __post_init__(self) -> None:
        crop_margin(self.crop_margin_mm)
        if self.workers < 0:
            raise ConfigError(f"radiomics.workers: must be >= 0 (0: one per core), got {self.workers}")

    @property
    def worker_processes(self) -> int:
        """``workers`` with 0 resolved to this machine's cores."""
        if self.workers:
            return self.workers
        return min(os.cpu_count() or 1, MAX_AUTO_RADIOMICS_WORKERS)


def crop_margin(value: float | str) -> float | str:
    """A ``crop_margin_mm`` value: ``"auto"``, or a finite number of mm >= 0 (also as text)."""
    if value == AUTO_MARGIN:
        return AUTO_MARGIN
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        margin = float(value)
    except (TypeError, ValueError):
        margin = math.nan
    if not (math.isfinite(margin) and margin >= 0):
        raise ConfigError(
            f"radiomics.crop_margin_mm: must be \"{AUTO_MARGIN}\" or a number of mm >= 0, "
            f"got {value!r}"
        )
    return margin


@dataclass(frozen=True)
class RegionalConfig:
    """Regional-variation and shape features of seed 003 (Wu et al. 2021); see
    ``dicomnode.analyse.regional``.

    Defaults: peritumoral rings of 5 and 10 mm (in-plane), 100-bin histograms over
    -1000..500 HU (all three as in the paper's public code); shape expansion to spherical
    harmonic degree 15 (the paper's); the body, which bounds the ring when no organ mask is
    given, is the largest connected region above -500 HU with its holes filled slice by slice
    (our choice; the paper's code used a lung mask).
    """

    #: Widths (mm) of the peritumoral rings, measured in-plane from the lesion.
    ring_widths_mm: tuple[float, ...] = (5.0, 10.0)
    hu_min: float = -1000.0
    hu_max: float = 500.0
    bins: int = 100
    #: Include the lesion in the "ring" region as the paper's public code does (its ring is
    #: the dilated lesion within lung or lesion); false compares with the ring alone.
    ring_includes_lesion: bool = True
    #: Highest spherical-harmonic degree of the shape descriptors.
    shape_degree: int = 15
    #: HU above which a voxel may belong to the body (largest component, holes filled).
    body_threshold_hu: float = -500.0


@dataclass(frozen=True)
class PredictionConfig:
    tmb_model_dir: Path = Path("models/tmb")
    subtype_model_dir: Path = Path("models/subtypes")


@dataclass(frozen=True)
class ReportConfig:
    template_file: Path = Path("sr_templates/tid1500_tmb.toml")
    manufacturer: str = "dicomnode"
    institution_name: str = ""
    device_observer_name: str = "dicomnode"
    #: How the SEG stores its frames. "auto": BINARY (1 bit a pixel) when Rows x Columns is a
    #: multiple of 8, else FRACTIONAL with values 0 or 255 (8 bits a pixel, read as binary):
    #: BINARY frames of other sizes start mid-byte, which OHIF 3.13 decodes in the wrong bit
    #: order (striped garbage on every second slice). "labelmap" (one 8-bit frame for all
    #: lesions, PS3.3 Supplement 243) is newer than dcmqi and dciodvfy here; see
    #: docs/conformance.md for what read which.
    seg_encoding: Literal["auto", "binary", "fractional", "labelmap"] = "auto"
    #: A Secondary Capture series with each lesion's key image (outline and results burned in),
    #: for viewers that show neither SEG nor SR.
    key_images: bool = True
    #: An Encapsulated PDF report with the results table, the key images and the models.
    pdf_report: bool = True


@dataclass(frozen=True)
class DestinationConfig:
    """Where results go. ``kind`` selects the fields that matter.

    - ``folder``: ``path``.
    - ``stow``: ``url`` (DICOMweb root), optional ``username`` with ``password_env`` or
      ``password_file``, or ``token_env`` / ``token_file`` for a bearer token;
      ``timeout_seconds``; ``ca_file`` for a private CA.
    - ``cstore``: ``ae_title``, ``host``, ``port``; ``tls = true`` for DICOM TLS, with
      ``ca_file`` for a private CA and ``tls_cert_file`` / ``tls_key_file`` when the peer
      wants a client certificate.
    """

    kind: Literal["folder", "stow", "cstore"] = "folder"
    name: str = "results"
    path: Path = Path("var/dicomnode/results")
    url: str = ""
    username: str = ""
    password_env: str = ""
    password_file: str = ""
    token_env: str = ""
    token_file: str = ""
    ca_file: str = ""
    timeout_seconds: float = 30.0
    ae_title: str = ""
    host: str = ""
    port: int = 0
    #: cstore only: DICOM TLS (1.2 or later) to the peer, whose certificate must chain to
    #: ``ca_file`` (or the system's CAs) and name ``host``.
    tls: bool = False
    #: cstore with TLS: this node's certificate and unencrypted key (PEM), for peers that
    #: require client certificates.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: stow: allow a username, password or token over plain ``http://`` (sent in clear on the
    #: network). Off: such a destination is refused at start-up; use https.
    allow_insecure_credentials: bool = False


@dataclass(frozen=True)
class DeliveryConfig:
    """Retry policy for temporary delivery failures (see ``dicomnode.jobs.machine.Backoff``)."""

    retry_initial_seconds: float = 10.0
    retry_factor: float = 2.0
    retry_max_seconds: float = 3600.0
    #: A job whose delivery keeps failing temporarily fails for good after this long.
    give_up_after_seconds: float = 86400.0


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    assembly: AssemblyConfig = field(default_factory=AssemblyConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    radiomics: RadiomicsConfig = field(default_factory=RadiomicsConfig)
    regional: RegionalConfig = field(default_factory=RegionalConfig)
    prediction: PredictionConfig = field(default_factory=PredictionConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    destinations: tuple[DestinationConfig, ...] = (DestinationConfig(),)

    def __post_init__(self) -> None:
        if self.runner.kind == "celery" and not self.http.enabled:
            raise ConfigError("runner.kind: celery workers talk to the node over HTTP: "
                              "set http.enabled = true")
        # Every relative path is resolved once, here, against the home: each stage then
        # gets its section with absolute paths, whatever the working directory.
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            resolved = (tuple(_with_absolute_paths(v) for v in value)
                        if isinstance(value, tuple) else _with_absolute_paths(value))
            object.__setattr__(self, section.name, resolved)

    def resolve(self, path: Path) -> Path:
        """A configured path, made absolute against the project home."""
        return path if path.is_absolute() else home() / path


def _with_absolute_paths(section: Any) -> Any:
    """``section`` with its relative paths made absolute against :func:`home`: fields of type
    ``Path``, and file names (``*_file``) given as text."""
    hints = typing.get_type_hints(type(section))
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if hints[f.name] is Path and not value.is_absolute():
            changes[f.name] = home() / value
        elif f.name.endswith("_file") and value and not Path(value).is_absolute():
            changes[f.name] = str(home() / value)
    return dataclasses.replace(section, **changes) if changes else section


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a TOML or environment value into the annotated type, or say which key is wrong."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() not in {"1", "0", "true", "false", "yes", "no"}:
                    raise ValueError(value)
                return value.lower() in {"1", "true", "yes"}
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if annotation is Path:
            return Path(str(value))
        if annotation is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError(value)
            return str(value)
        if origin is tuple:
            # A TOML array, or a comma-separated environment value ("5,10").
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ValueError(value)
            item_type = typing.get_args(annotation)[0]
            return tuple(_coerce(item, item_type, where) for item in items)
    except (TypeError, ValueError):
        name = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"{where}: expected {name}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported type {annotation}")  # pragma: no cover


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in table.items()}
    return cls(**kwargs)


def _env_overrides(environ: typing.Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        out.setdefault(section, {})[key] = value
    return out


def from_mapping(data: dict[str, Any], environ: typing.Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document (plus environment overrides) into a :class:`Config`."""
    environ = os.environ if environ is None else environ
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sorted(sections))})")
    overrides = _env_overrides(environ)
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for name in sections:
        if name == "destinations":
            continue
        table = dict(data.get(name, {}))
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: expected a table")
        table.update(overrides.pop(name, {}))
        kwargs[name] = _build(hints[name], table, name)
    destinations = data.get("destinations")
    if destinations is not None:
        if not isinstance(destinations, list) or not destinations:
            raise ConfigError("destinations: expected a non-empty array of tables ([[destinations]])")
        built = tuple(
            _build(DestinationConfig, d, f"destinations[{i}]") for i, d in enumerate(destinations)
        )
        for i, d in enumerate(built):
            _check_destination(d, f"destinations[{i}]")
        kwargs["destinations"] = built
    overrides.pop("destinations", None)
    if overrides:
        bad = next(iter(overrides))
        raise ConfigError(f"environment {ENV_PREFIX}{bad.upper()}__...: unknown section {bad!r}")
    return Config(**kwargs)


def _check_destination(d: DestinationConfig, where: str) -> None:
    if d.kind == "stow":
        _check_stow_url(d, where)
    if d.kind == "cstore":
        if not (d.ae_title and d.host and d.port):
            raise ConfigError(f"{where}: a cstore destination needs ae_title, host and port")
        if not 1 <= d.port <= 65535:
            raise ConfigError(f"{where}.port: must lie in 1..65535, got {d.port}")
    if d.tls and d.kind != "cstore":
        raise ConfigError(f"{where}.tls: only a cstore destination uses it (use an https URL)")
    if d.allow_insecure_credentials and d.kind != "stow":
        raise ConfigError(f"{where}.allow_insecure_credentials: only a stow destination uses it")
    if bool(d.tls_cert_file) != bool(d.tls_key_file):
        raise ConfigError(f"{where}: give both tls_cert_file and tls_key_file, or neither")
    if d.tls_cert_file and not d.tls:
        raise ConfigError(f"{where}.tls_cert_file: set tls = true to use a client certificate")
    if d.password_env and d.password_file:
        raise ConfigError(f"{where}: give password_env or password_file, not both")
    if d.token_env and d.token_file:
        raise ConfigError(f"{where}: give token_env or token_file, not both")


#: Keys that make a stow destination send credentials with every request.
_CREDENTIAL_KEYS = ("username", "password_env", "password_file", "token_env", "token_file")


def _check_stow_url(d: DestinationConfig, where: str) -> None:
    """A DICOMweb root that parses, and no credentials sent in clear over the network.

    The URL's value is never echoed: it may carry a password.
    """
    if any(c.isspace() or not c.isprintable() for c in d.url):
        # urlsplit silently drops tabs and newlines: what it parsed is not what is sent.
        raise ConfigError(f"{where}.url: contains spaces or control characters")
    try:
        url = urllib.parse.urlsplit(d.url)
    except ValueError as exc:
        raise ConfigError(f"{where}.url: not a valid URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"{where}.url: a stow destination needs an http(s) DICOMweb URL "
                          "with a host, e.g. https://pacs.example.org/dicom-web")
    if not _port_ok(url):
        raise ConfigError(f"{where}.url: the port must be a number in 1..65535")
    if url.username is not None or url.password is not None:
        raise ConfigError(f"{where}.url: no user or password in the URL (it is not a secret "
                          "store): use username with password_env or password_file")
    sent = [key for key in _CREDENTIAL_KEYS if getattr(d, key)]
    if (sent and url.scheme == "http" and not d.allow_insecure_credentials
            and not _is_loopback(url.hostname)):
        raise ConfigError(
            f"{where}.url: {sent[0]} over plain http:// would cross the network in clear: use "
            f"an https:// URL (or, on a network you trust, {where}.allow_insecure_credentials "
            "= true)")


def _port_ok(url: urllib.parse.SplitResult) -> bool:
    """Whether the URL has no port, or one in 1..65535."""
    try:
        return url.port is None or url.port > 0  # .port raises beyond 65535 or for text
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (traffic to it never leaves it)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load(path: Path | str | None = None, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Load and validate a listener configuration (defaults only when ``path`` is None)."""
    if path is None:
        return from_mapping({}, environ)
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return from_mapping(data, environ)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def with_changes(config: Config, section: str, **changes: Any) -> Config:
    """A copy of ``config`` with some keys of one section replaced (CLI options)."""
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def read_secret(env_name: str, file_name: str) -> str | None:
    """Read a secret from the named environment variable or file; ``None`` when neither is set."""
    if env_name:
        value = os.environ.get(env_name)
        if value is None:
            raise ConfigError(f"environment variable {env_name} (named in the config) is not set")
        return value
    if file_name:
        try:
            return Path(file_name).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"secret file {file_name}: {exc.strerror}") from None
    return None
