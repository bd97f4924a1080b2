//! "Why is this plugin blocked, and since when?": the worker's last observation of every
//! plugin, kept in the private store so that any replica (and `routes`) can show it.
//!
//! Two keys of the worker's own (older replicas rewrite `scrape_counters` and would drop
//! members they do not know, so nothing new goes there):
//!
//! - [`OBSERVATIONS_KEY`] (`scrape_observations`), rewritten by the lease holder only when
//!   an entry changed, fenced like a route write:
//!   `{"v":1,"tick":T,"holder":H,"details":[D...],"by_status":{"<status>":{"<id>":E}}}`
//!   `tick` is stored once: the tick that wrote the record. Plugins are grouped by their
//!   route status after that tick (written or kept). Per plugin, `E` is
//!   - *since* alone when the plugin reported exactly that status (`"ok"`): the seconds
//!     before `tick` at which this worker first saw the status, or `null` (unknown: the
//!     status was already there when it first looked);
//!   - otherwise an array `[since, outcome, ...]`: `[since, "ok", reported]` when it
//!     reported another status (e.g. a blocked route still short of
//!     `--healthy-threshold`), `[since, "failed", error_kind, detail]` (`detail` an index
//!     into `details`, or `null`), or `[since, "cut_off"]`.
//!
//!   A detail is cut to [`DETAIL_CHARS`] characters and stored once in `details`
//!   (a mass failure repeats one text). The record is kept under [`MAX_BYTES`]: if it would
//!   not fit, the details are dropped (`"details_dropped":true`), then entries of plugins
//!   that answered `ok` (`"omitted": n`); a reader shows those as omitted, never guessed.
//! - [`LAST_TICK_KEY`] (`scrape_last_tick`), `{"tick","holder","completed_at"}`: the
//!   replica that completed the last tick and when, rewritten (fenced) by every tick.
//!
//! [`next`] is pure: the previous record and this tick's results give the next record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::decision::Counters;
use crate::events;
use crate::probe::ProbeOutcome;
use crate::registry::{parse_ids, REGISTRY_KEY};
use crate::route::route_key;
use crate::store::{read_each, Entry, Fence, Save, Store, StoreError, StoreKind, ABSENT_ETAG};
use crate::tick::COUNTERS_KEY;

/// The observations' key in the private store.
pub const OBSERVATIONS_KEY: &str = "scrape_observations";
/// The last completed tick's key in the private store.
pub const LAST_TICK_KEY: &str = "scrape_last_tick";
/// Characters of a failure's detail that are kept.
pub const DETAIL_CHARS: usize = 160;
/// The encoded record never exceeds this (Dapr's and tonic's default message limit is
/// 4 MB; this leaves room for everything else in the same call).
pub const MAX_BYTES: usize = 2 * 1024 * 1024;
/// The size [`fit`] aims below, leaving slack for the header.
const BUDGET: usize = MAX_BYTES - 4096;
const VERSION: u64 = 1;

/// Shared text: statuses, error kinds and details repeat across thousands of plugins
/// (a mass failure has one detail), so each distinct text is held once ([`Interner`]).
pub type Text = Arc<str>;

/// Hands out one shared copy of each distinct text.
#[derive(Default)]
pub struct Interner(HashSet<Text>);

impl Interner {
    pub fn get(&mut self, text: &str) -> Text {
        if let Some(t) = self.0.get(text) {
            return t.clone();
        }
        let t: Text = Arc::from(text);
        self.0.insert(t.clone());
        t
    }
}

/// The last probe outcome of one plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The plugin answered with this status (route vocabulary).
    Reported(Text),
    /// The probe failed (after retries) with this `error_kind`; the detail is the
    /// plugin's or the transport's own text, cut to [`DETAIL_CHARS`] (None once dropped
    /// to keep the record under its size budget).
    Failed {
        error_kind: Text,
        detail: Option<Text>,
    },
    /// The tick's probe deadline cut the probe off: no observation this tick.
    CutOff,
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Reported(_) => "reported",
            Outcome::Failed { .. } => "failed",
            Outcome::CutOff => "cut_off",
        }
    }
}

/// One plugin's entry in the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    /// The route status after the tick.
    pub status: Text,
    /// Unix seconds of the first tick this worker saw `status`; None = unknown.
    pub since: Option<i64>,
    pub outcome: Outcome,
}

/// The decoded `scrape_observations` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observations {
    /// Unix seconds of the tick that wrote the record.
    pub tick: i64,
    pub holder: String,
    pub plugins: BTreeMap<String, Kept>,
    /// The details were dropped to keep the record under [`MAX_BYTES`].
    pub details_dropped: bool,
    /// Entries left out to keep the record under [`MAX_BYTES`].
    pub omitted: u64,
}

/// What one tick did for one plugin whose route it read: the input of [`next`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub plugin_id: String,
    /// The route status after the write phase (written, or kept as read).
    pub status: Text,
    /// Whether this tick wrote that status.
    pub written: bool,
    pub outcome: Outcome,
}

/// This tick's outcome of each plugin whose route was read, as a [`Seen`] with the status
/// as read, built one plugin at a time and taking each id by value: the tick hands over
/// the ids of the routes it leaves alone as it is done with them, instead of copying every
/// id (at 50 000 plugins the copies were megabytes at the tick's peak).
pub struct Recorder {
    texts: Interner,
    rows: Vec<Seen>,
}

impl Recorder {
    pub fn with_capacity(n: usize) -> Recorder {
        Recorder {
            texts: Interner::default(),
            rows: Vec::with_capacity(n),
        }
    }

    /// One plugin: its id, its route's status as read (shared by the tick), its probe.
    pub fn push(&mut self, id: String, current: Text, probe: &ProbeOutcome) {
        let texts = &mut self.texts;
        let outcome = match probe {
            ProbeOutcome::Reported(s) => Outcome::Reported(texts.get(s.as_str())),
            ProbeOutcome::Failed(f) => Outcome::Failed {
                error_kind: texts.get(f.kind.as_str()),
                detail: Some(texts.get(&cut_detail(&f.detail))),
            },
            ProbeOutcome::CutOff => Outcome::CutOff,
        };
        self.rows.push(Seen {
            plugin_id: id,
            status: current,
            written: false,
            outcome,
        });
    }

    /// The rows, each with the status as read and `written` false.
    pub fn finish(self) -> Vec<Seen> {
        self.rows
    }
}

/// Joins the [`Recorder`]'s rows with the write phase's results, in place: `after` maps a
/// plugin to the status its write left (`true`: written now), or to None when its route
/// is gone (its row is dropped); a plugin not in `after` kept the status it was read with.
pub fn seen(mut observed: Vec<Seen>, after: &HashMap<String, Option<(String, bool)>>) -> Vec<Seen> {
    observed.retain_mut(|s| match after.get(&s.plugin_id) {
        None => true,
        Some(None) => false,
        Some(Some((status, written))) => {
            s.status = Text::from(status.as_str());
            s.written = *written;
            true
        }
    });
    observed
}

/// A malformed stored value.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ObservationsError {
    #[error("{key} is not an observations record of this worker: {why}")]
    Malformed { key: &'static str, why: String },
}

/// Cuts `text` to at most [`DETAIL_CHARS`] characters, marking a cut with `…`.
pub fn cut_detail(text: &str) -> String {
    if text.chars().count() <= DETAIL_CHARS {
        return text.to_string();
    }
    let mut out: String = text.chars().take(DETAIL_CHARS - 1).collect();
    out.push('…');
    out
}

/// The next record from the previous one and this tick's results (`tick`: Unix seconds).
/// Plugins not in `seen` (unregistered, route missing or unreadable) are dropped.
/// *since* is this tick when the status was written now or differs from the one kept
/// before, is carried over while the status stays, and is unknown when this worker sees
/// the plugin for the first time without changing it.
pub fn next(prev: Option<&Observations>, tick: i64, holder: &str, seen: &[Seen]) -> Observations {
    next_owned(prev.cloned(), tick, holder, seen.to_vec()).0
}

/// [`next`], consuming its inputs (at 50 000 plugins each is megabytes: the previous
/// record's entries are freed as the new ones are made), and whether the result says
/// something the previous record did not (as [`changed`]; a record over its size budget
/// always counts as changed).
pub fn next_owned(
    prev: Option<Observations>,
    tick: i64,
    holder: &str,
    seen: Vec<Seen>,
) -> (Observations, bool) {
    let (obs, differs, _) = next_encoded(prev, tick, holder, seen);
    (obs, differs)
}

/// [`next_owned`], with the record's encoding (made once, by the size check).
pub fn next_encoded(
    prev: Option<Observations>,
    tick: i64,
    holder: &str,
    seen: Vec<Seen>,
) -> (Observations, bool, Vec<u8>) {
    let (merged, differs, prev_flags) = merge(prev, tick, seen);
    let (obs, data) = fitted(merged, tick, holder);
    let differs = differs
        || obs.details_dropped
        || obs.omitted > 0
        || prev_flags.is_some_and(|f| f != (false, 0));
    (obs, differs, data)
}

/// The next record of `merged`, cut to fit its budget, and its encoding.
fn fitted(merged: Vec<(String, Kept)>, tick: i64, holder: &str) -> (Observations, Vec<u8>) {
    let mut obs = Observations {
        tick,
        holder: holder.to_string(),
        plugins: merged.into_iter().collect(),
        details_dropped: false,
        omitted: 0,
    };
    let data = fit(&mut obs);
    (obs, data)
}

/// What [`save`] needs of [`next_encoded`]: whether the record changed, its encoding,
/// and the entries back when it fit (as they are, nothing dropped: what [`RecordCache`]
/// keeps). A record within its size budget (every record but a huge fleet's) is encoded
/// straight from the merged entries, without building the next record's map.
#[allow(clippy::type_complexity)]
fn encoded(
    merged: Vec<(String, Kept)>,
    differs: bool,
    prev_flags: Option<(bool, u64)>,
    tick: i64,
    holder: &str,
) -> (bool, Vec<u8>, Option<Vec<(String, Kept)>>) {
    let data = encode_parts(
        tick,
        holder,
        false,
        0,
        merged.iter().map(|(id, kept)| (id.as_str(), kept)),
    );
    if data.len() <= BUDGET {
        let changed = differs || prev_flags.is_some_and(|f| f != (false, 0));
        return (changed, data, Some(merged));
    }
    drop(data);
    // Over the budget: `fit` drops what it must (and that always counts as a change).
    let (_, data) = fitted(merged, tick, holder);
    (true, data, None)
}

/// The record this process wrote last, kept between its ticks (`run` ticks again and
/// again with one [`RecordCache`]): its bytes as written and its entries. When the
/// stored record is still exactly those bytes (no other replica wrote since), the next
/// tick merges into the entries instead of decoding the record again (at 50 000 plugins
/// about 10 ms of a tick's CPU). Any other stored value is decoded as always. It holds
/// the record's size in memory between ticks (about 7 MB at 50 000 plugins).
#[derive(Default)]
pub struct RecordCache(std::sync::Mutex<Option<LastWritten>>);

struct LastWritten {
    data: Vec<u8>,
    entries: Vec<(String, Kept)>,
}

impl RecordCache {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<LastWritten>> {
        // A panic while holding it left an Option: still usable.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The kept entries when `stored` is exactly the record they were written as; the
    /// cache is empty afterwards either way.
    fn take_if_stored(&self, stored: &[u8]) -> Option<LastWritten> {
        self.slot().take().filter(|last| last.data == stored)
    }

    fn keep(&self, data: Vec<u8>, entries: Vec<(String, Kept)>) {
        *self.slot() = Some(LastWritten { data, entries });
    }
}

/// The merge of [`next_encoded`]: the next entries in id order, whether they differ from
/// the previous record's, and the previous record's size flags.
#[allow(clippy::type_complexity)]
fn merge(
    prev: Option<Observations>,
    tick: i64,
    seen: Vec<Seen>,
) -> (Vec<(String, Kept)>, bool, Option<(bool, u64)>) {
    match prev {
        Some(p) => {
            let flags = (p.details_dropped, p.omitted);
            merge_into(Some(p.plugins.into_iter()), Some(flags), tick, seen)
        }
        None => merge_into(None::<std::vec::IntoIter<(String, Kept)>>, None, tick, seen),
    }
}

/// [`merge`] from the previous record's entries in id order (None: no previous record).
#[allow(clippy::type_complexity)]
fn merge_into<I: Iterator<Item = (String, Kept)>>(
    before: Option<I>,
    prev_flags: Option<(bool, u64)>,
    tick: i64,
    mut seen: Vec<Seen>,
) -> (Vec<(String, Kept)>, bool, Option<(bool, u64)>) {
    use std::cmp::Ordering;
    let mut differs = before.is_none();
    let before = before.into_iter().flatten();
    // Both sides in id order, merged in one pass (no lookup per plugin); the sort is
    // stable, so of two entries for one id the later wins, as with inserts.
    seen.sort_by(|a, b| a.plugin_id.cmp(&b.plugin_id));
    let mut before = before.into_iter().peekable();
    let mut merged: Vec<(String, Kept)> = Vec::with_capacity(seen.len());
    for s in seen {
        let mut old = None;
        while let Some((id, _)) = before.peek() {
            match id.as_str().cmp(&s.plugin_id) {
                // A plugin of the previous record that this tick did not see: dropped.
                Ordering::Less => {
                    before.next();
                    differs = true;
                }
                Ordering::Equal => {
                    old = before.next().map(|(_, kept)| kept);
                    break;
                }
                Ordering::Greater => break,
            }
        }
        let since = match &old {
            _ if s.written => Some(tick),
            Some(b) if b.status == s.status => b.since,
            Some(_) => Some(tick),
            None => None,
        };
        let outcome = match s.outcome {
            Outcome::Failed {
                error_kind,
                detail: Some(d),
            } if d.chars().count() > DETAIL_CHARS => Outcome::Failed {
                error_kind,
                detail: Some(Text::from(cut_detail(&d))),
            },
            other => other,
        };
        let kept = Kept {
            status: s.status,
            since,
            outcome,
        };
        differs |= old.as_ref() != Some(&kept);
        // Two rows of one id (a registry listing it twice): the later one stays, as a
        // map would keep it.
        match merged.last_mut() {
            Some((last, k)) if *last == s.plugin_id => *k = kept,
            _ => merged.push((s.plugin_id, kept)),
        }
    }
    differs |= before.next().is_some();
    (merged, differs, prev_flags)
}

/// Whether `next` says something `prev` does not (the header aside): only then is the
/// record rewritten.
pub fn changed(prev: Option<&Observations>, next: &Observations) -> bool {
    match prev {
        None => true,
        Some(p) => {
            p.plugins != next.plugins
                || p.details_dropped != next.details_dropped
                || p.omitted != next.omitted
        }
    }
}

/// Appends `text` as a JSON string.
fn push_json_str(out: &mut String, text: &str) {
    // Ids, statuses and kinds need no escape: copied as they are.
    if !text.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push('"');
        out.push_str(text);
        out.push('"');
        return;
    }
    // Serializing a string cannot fail.
    out.push_str(&serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into()));
}

/// Appends one plugin's entry (see the module docs).
fn push_entry(out: &mut String, tick: i64, kept: &Kept, details: &mut Details) {
    use std::fmt::Write;
    struct Since(Option<i64>);
    impl std::fmt::Display for Since {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self.0 {
                None => f.write_str("null"),
                Some(s) => write!(f, "{s}"),
            }
        }
    }
    let since = Since(kept.since.map(|s| tick.saturating_sub(s)));
    match &kept.outcome {
        Outcome::Reported(st) if *st == kept.status => {
            let _ = write!(out, "{since}");
        }
        Outcome::Reported(st) => {
            let _ = write!(out, "[{since},\"ok\",");
            push_json_str(out, st);
            out.push(']');
        }
        Outcome::Failed { error_kind, detail } => {
            let _ = write!(out, "[{since},\"failed\",");
            push_json_str(out, error_kind);
            match detail {
                Some(d) => {
                    let _ = write!(out, ",{}]", details.index(d));
                }
                None => out.push_str(",null]"),
            }
        }
        Outcome::CutOff => {
            let _ = write!(out, "[{since},\"cut_off\"]");
        }
    }
}

#[derive(Default)]
struct Details {
    texts: Vec<String>,
    at: HashMap<String, usize>,
}

impl Details {
    fn index(&mut self, text: &str) -> usize {
        if let Some(i) = self.at.get(text) {
            return *i;
        }
        let i = self.texts.len();
        self.texts.push(text.to_string());
        self.at.insert(text.to_string(), i);
        i
    }
}

/// RFC 3339, whole seconds, UTC (`2026-12-01T20:15:00Z`).
pub fn rfc3339(unix: i64) -> String {
    Utc.timestamp_opt(unix, 0).single().map_or_else(
        || unix.to_string(),
        |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
    )
}

fn parse_time(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp())
}

/// Encodes the record: groups by status, plugins sorted by id, details in first-use
/// order. Written straight into one buffer (no intermediate JSON tree: at 50 000
/// plugins that tree would cost more memory than the record itself).
pub fn encode(obs: &Observations) -> Vec<u8> {
    encode_parts(
        obs.tick,
        &obs.holder,
        obs.details_dropped,
        obs.omitted,
        obs.plugins.iter().map(|(id, kept)| (id.as_str(), kept)),
    )
}

/// [`encode`] from the record's parts; `entries` in id order.
fn encode_parts<'a>(
    tick: i64,
    holder: &str,
    details_dropped: bool,
    omitted: u64,
    entries: impl Iterator<Item = (&'a str, &'a Kept)>,
) -> Vec<u8> {
    use std::fmt::Write;
    let mut details = Details::default();
    let mut groups: BTreeMap<&str, Vec<(&str, &Kept)>> = BTreeMap::new();
    let mut count = 0usize;
    for (id, kept) in entries {
        count += 1;
        groups.entry(&kept.status).or_default().push((id, kept));
    }
    let mut body = String::with_capacity(count * 32 + 64);
    body.push_str("\"by_status\":{");
    for (g, (status, entries)) in groups.iter().enumerate() {
        if g > 0 {
            body.push(',');
        }
        push_json_str(&mut body, status);
        body.push_str(":{");
        for (i, (id, kept)) in entries.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            push_json_str(&mut body, id);
            body.push(':');
            push_entry(&mut body, tick, kept, &mut details);
        }
        body.push('}');
    }
    body.push('}');
    let mut out = String::with_capacity(body.len() + 256);
    let _ = write!(
        out,
        "{{\"v\":{VERSION},\"tick\":\"{}\",\"holder\":",
        rfc3339(tick)
    );
    push_json_str(&mut out, holder);
    if details_dropped {
        out.push_str(",\"details_dropped\":true");
    }
    if omitted > 0 {
        let _ = write!(out, ",\"omitted\":{omitted}");
    }
    out.push_str(",\"details\":[");
    for (i, d) in details.texts.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, d);
    }
    out.push_str("],");
    out.push_str(&body);
    out.push('}');
    out.into_bytes()
}

/// Keeps the encoded record under [`MAX_BYTES`]: drops the details first, then the
/// entries of plugins that answered `ok`, then any entries, counting them in `omitted`.
/// Returns the record's encoding.
fn fit(obs: &mut Observations) -> Vec<u8> {
    let data = encode(obs);
    if data.len() <= BUDGET {
        return data;
    }
    drop(data);
    obs.details_dropped = true;
    for kept in obs.plugins.values_mut() {
        if let Outcome::Failed { detail, .. } = &mut kept.outcome {
            *detail = None;
        }
    }
    let data = encode(obs);
    let mut size = data.len();
    if size <= BUDGET {
        return data;
    }
    drop(data);
    // Each entry costs its id, its value and `"":,` around them.
    let cost = |id: &str, k: &Kept| {
        let mut e = String::new();
        push_entry(&mut e, obs.tick, k, &mut Details::default());
        id.len() + 4 + e.len()
    };
    let mut order: Vec<(bool, String, usize)> = obs
        .plugins
        .iter()
        .map(|(id, k)| {
            (
                !matches!(k.outcome, Outcome::Reported(ref s) if *s == k.status),
                id.clone(),
                cost(id, k),
            )
        })
        .collect();
    // Plugins that answered `ok` go first; within each group, from the last id.
    order.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1)));
    for (_, id, c) in order {
        if size <= BUDGET {
            break;
        }
        obs.plugins.remove(&id);
        obs.omitted += 1;
        size = size.saturating_sub(c);
    }
    encode(obs)
}

fn malformed(key: &'static str, why: impl Into<String>) -> ObservationsError {
    ObservationsError::Malformed {
        key,
        why: why.into(),
    }
}

/// The stored shape. `by_status` is kept as raw text and read entry by entry
/// ([`GroupsSeed`]), so no JSON tree of the whole record is ever built.
#[derive(Deserialize)]
struct RawRecord<'a> {
    v: u64,
    tick: String,
    holder: String,
    #[serde(default)]
    details: Vec<String>,
    #[serde(borrow)]
    by_status: &'a serde_json::value::RawValue,
    #[serde(default)]
    details_dropped: bool,
    #[serde(default)]
    omitted: u64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawEntry {
    Since(Option<i64>),
    Full(Vec<Value>),
}

/// Reads `{"<status>": {"<id>": E}}` straight into `out`.
struct GroupsSeed<'a> {
    tick: i64,
    details: &'a [Text],
    texts: &'a mut Interner,
    out: &'a mut BTreeMap<String, Kept>,
}

impl<'de> DeserializeSeed<'de> for GroupsSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for GroupsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object of status groups")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(status) = map.next_key::<String>()? {
            let status = self.texts.get(&status);
            map.next_value_seed(GroupSeed {
                tick: self.tick,
                status,
                details: self.details,
                texts: &mut *self.texts,
                out: &mut *self.out,
            })?;
        }
        Ok(())
    }
}

/// Reads one status group `{"<id>": E}` straight into `out`.
struct GroupSeed<'a> {
    tick: i64,
    status: Text,
    details: &'a [Text],
    texts: &'a mut Interner,
    out: &'a mut BTreeMap<String, Kept>,
}

impl<'de> DeserializeSeed<'de> for GroupSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for GroupSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object of plugin entries")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(id) = map.next_key::<String>()? {
            let raw: RawEntry = map.next_value()?;
            let kept = decode_entry(self.tick, &self.status, raw, self.details, self.texts)
                .map_err(|why| A::Error::custom(format!("entry {id:?}: {why}")))?;
            self.out.insert(id, kept);
        }
        Ok(())
    }
}

fn decode_entry(
    tick: i64,
    status: &Text,
    e: RawEntry,
    details: &[Text],
    texts: &mut Interner,
) -> Result<Kept, String> {
    let since_of = |v: Option<i64>| match v {
        None => Ok(None),
        Some(s) if s >= 0 => Ok(Some(tick - s)),
        Some(_) => Err("since is a negative number of seconds".to_string()),
    };
    let a = match e {
        RawEntry::Full(a) => a,
        RawEntry::Since(since) => {
            return Ok(Kept {
                status: status.clone(),
                since: since_of(since)?,
                outcome: Outcome::Reported(status.clone()),
            })
        }
    };
    let text = |i: usize| a.get(i).and_then(Value::as_str);
    let since = match a.first() {
        Some(Value::Null) => None,
        Some(n) => since_of(Some(n.as_i64().ok_or("since is not a number of seconds")?))?,
        None => return Err("an empty entry".into()),
    };
    let outcome = match text(1) {
        Some("ok") => Outcome::Reported(texts.get(text(2).ok_or("no reported status")?)),
        Some("cut_off") => Outcome::CutOff,
        Some("failed") => Outcome::Failed {
            error_kind: texts.get(text(2).ok_or("no error_kind")?),
            detail: match a.get(3) {
                None | Some(Value::Null) => None,
                Some(i) => Some(
                    i.as_u64()
                        .and_then(|i| usize::try_from(i).ok())
                        .and_then(|i| details.get(i))
                        .ok_or("detail index out of range")?
                        .clone(),
                ),
            },
        },
        _ => return Err("unknown outcome".into()),
    };
    Ok(Kept {
        status: status.clone(),
        since,
        outcome,
    })
}

/// Why `data` is not a record, for the error path only (it may build a JSON tree).
fn explain(data: &[u8], typed: &serde_json::Error) -> ObservationsError {
    let why = match serde_json::from_slice::<Value>(data) {
        Err(e) => format!("not JSON ({e})"),
        Ok(v) if !v.is_object() => "not a JSON object".into(),
        Ok(v) => match v.get("v").and_then(Value::as_u64) {
            None => "no layout version \"v\"".into(),
            Some(other) if other != VERSION => {
                format!("layout version {other}, this worker reads version {VERSION}")
            }
            Some(_) => typed.to_string(),
        },
    };
    malformed(OBSERVATIONS_KEY, why)
}

/// Decodes a stored record; anything unexpected is an error naming what was wrong.
pub fn decode(data: &[u8]) -> Result<Observations, ObservationsError> {
    let raw: RawRecord = serde_json::from_slice(data).map_err(|e| explain(data, &e))?;
    if raw.v != VERSION {
        return Err(malformed(
            OBSERVATIONS_KEY,
            format!(
                "layout version {}, this worker reads version {VERSION}",
                raw.v
            ),
        ));
    }
    let tick = parse_time(&raw.tick)
        .ok_or_else(|| malformed(OBSERVATIONS_KEY, "\"tick\" is not an RFC 3339 time"))?;
    let details: Vec<Text> = raw.details.iter().map(|d| Text::from(d.as_str())).collect();
    let mut texts = Interner::default();
    let mut plugins = BTreeMap::new();
    let mut de = serde_json::Deserializer::from_str(raw.by_status.get());
    GroupsSeed {
        tick,
        details: &details,
        texts: &mut texts,
        out: &mut plugins,
    }
    .deserialize(&mut de)
    .map_err(|e| malformed(OBSERVATIONS_KEY, format!("\"by_status\": {e}")))?;
    Ok(Observations {
        tick,
        holder: raw.holder,
        plugins,
        details_dropped: raw.details_dropped,
        omitted: raw.omitted,
    })
}

/// The `scrape_last_tick` record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastTick {
    /// The tick's name (its cron slot, or the time of a manual tick).
    pub tick: String,
    /// The replica that completed it.
    pub holder: String,
    /// When it completed, on that replica's clock.
    pub completed_at: String,
}

fn emit_store_error(store: &dyn Store, operation: &str, error: String) {
    events::StoreError {
        store: store.store_name(StoreKind::Private).to_string(),
        operation: operation.to_string(),
        error,
    }
    .emit();
}

/// The previous record and the last-tick entry as stored, read while the plugins are
/// probed; [`save`] decodes the record (after the writes, when the routes the tick read
/// are freed: at 50 000 plugins the decoded record is megabytes), merges, encodes and
/// writes.
pub struct Prepared {
    /// The stored record; None when the store failed (nothing is written this tick).
    stored: Option<Option<Entry>>,
    last: Option<Entry>,
}

/// Reads the previous record and the last-tick entry. A failed read is reported
/// (`store_error`) and makes [`save`] write nothing.
pub async fn prepare(store: &dyn Store) -> Prepared {
    let keys = [OBSERVATIONS_KEY.to_string(), LAST_TICK_KEY.to_string()];
    let read = match read_each(store, StoreKind::Private, &keys, 2).await {
        Ok(r) => r,
        Err(e) => {
            emit_store_error(store, "read_observations", e.to_string());
            return Prepared {
                stored: None,
                last: None,
            };
        }
    };
    let mut read = read.into_iter();
    let stored = read.next().unwrap_or(Ok(None));
    let last = read.next().unwrap_or(Ok(None)).unwrap_or(None);
    let stored = match stored {
        Err(e) => {
            emit_store_error(store, "read_observations", e.to_string());
            None
        }
        Ok(entry) => Some(entry),
    };
    Prepared { stored, last }
}

/// The tick's hook: saves the next record when it changed (from [`prepare`]'s read), and
/// records this tick as the last completed, both fenced by the lease. Failures are
/// reported (`store_error`) and never fail the tick: the routes are already written.
pub async fn save(
    store: &dyn Store,
    fence: &Fence,
    tick: &LastTick,
    tick_unix: i64,
    seen: Vec<Seen>,
    prepared: Prepared,
    cache: &RecordCache,
) {
    let Prepared { stored, last } = prepared;
    let Some(mut entry) = stored else {
        return;
    };
    // The record this process wrote last, when it is still the stored one.
    let kept = entry.as_ref().and_then(|e| cache.take_if_stored(&e.data));
    let (merged, differs, prev_flags, unchanged_bytes) = match kept {
        Some(LastWritten { data, entries }) => {
            // The stored copy of those bytes is not needed (the ETag stays for the write).
            if let Some(e) = entry.as_mut() {
                e.data = Vec::new();
            }
            let (merged, differs, flags) =
                merge_into(Some(entries.into_iter()), Some((false, 0)), tick_unix, seen);
            (merged, differs, flags, Some(data))
        }
        None => {
            // An unreadable record is replaced: it is this worker's own, and the only
            // loss is the since-times, which become unknown.
            // The stored bytes are freed once decoded (the ETag stays for the write).
            let prev = entry
                .as_mut()
                .and_then(|e| match decode(&std::mem::take(&mut e.data)) {
                    Ok(o) => Some(o),
                    Err(err) => {
                        emit_store_error(
                            store,
                            "read_observations",
                            format!("{err}; it is replaced and the since-times start again"),
                        );
                        None
                    }
                });
            let (merged, differs, flags) = merge(prev, tick_unix, seen);
            (merged, differs, flags, None)
        }
    };
    let (changed, data, entries) = encoded(merged, differs, prev_flags, tick_unix, &tick.holder);
    if entry.is_none() || changed {
        let written = write(store, fence, OBSERVATIONS_KEY, entry.as_ref(), &data).await;
        if let (true, Some(entries)) = (written, entries) {
            cache.keep(data, entries);
        }
    } else if let (Some(bytes), Some(entries)) = (unchanged_bytes, entries) {
        // Nothing changed: the stored record is still the one kept, and these entries
        // say what it says.
        cache.keep(bytes, entries);
    }
    match serde_json::to_vec(tick) {
        Ok(data) => {
            write(store, fence, LAST_TICK_KEY, last.as_ref(), &data).await;
        }
        Err(e) => emit_store_error(store, "write_last_tick", format!("cannot encode: {e}")),
    }
}

/// A fenced compare-and-set write of one of these keys; false (reported) when it failed.
async fn write(
    store: &dyn Store,
    fence: &Fence,
    key: &str,
    stored: Option<&Entry>,
    data: &[u8],
) -> bool {
    let etag = stored.map_or(ABSENT_ETAG, |e| e.etag.as_str());
    match store
        .save_fenced(StoreKind::Private, Save::cas(key, data, etag), fence)
        .await
    {
        Ok(()) => true,
        Err(e) => {
            let operation = if key == OBSERVATIONS_KEY {
                "write_observations"
            } else {
                "write_last_tick"
            };
            emit_store_error(store, operation, e.to_string());
            false
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reading it back: `routes` and the status page.
// ---------------------------------------------------------------------------------------

/// One plugin as `routes` and the status page show it. Every value comes from the store;
/// what is missing or unreadable says so (`observation`, `error`, `counters_error`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PluginRow {
    pub plugin_id: String,
    /// The route's status; null when the route is missing or unreadable.
    pub status: Option<String>,
    /// Why the route (or the id) is unreadable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `present`, `missing` (no entry for this plugin, or no record at all),
    /// `unreadable` (the record could not be read) or `omitted` (left out of a record
    /// over its size budget).
    pub observation: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observation_error: Option<String>,
    /// The tick of the record the observation comes from.
    pub observed_tick: Option<String>,
    /// RFC 3339, or `unknown`; null without an observation. Also `unknown` when the
    /// route's status is no longer the one observed.
    pub since: Option<String>,
    /// `reported`, `failed` or `cut_off`.
    pub last_outcome: Option<String>,
    /// The status the plugin last reported.
    pub reported_status: Option<String>,
    pub error_kind: Option<String>,
    /// The plugin's (or the transport's) own text, cut to 160 characters.
    pub detail: Option<String>,
    /// From `scrape_counters`; null when it is unreadable.
    pub consecutive_failures: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters_error: Option<String>,
}

/// Everything the status page shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    /// The replica that completed the last tick and when; null when unknown.
    pub last_tick: Option<LastTick>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_tick_error: Option<String>,
    /// `present`, `missing` or `unreadable`.
    pub observations: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observations_error: Option<String>,
    /// The details were dropped from the record to keep it under its size budget.
    pub details_dropped: bool,
    pub plugins: Vec<PluginRow>,
}

/// A failure that leaves nothing to show (the registry unreadable, the store down).
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{REGISTRY_KEY} is unreadable: {0}")]
    Registry(String),
}

/// Reads the registry, every route, the counters, the observations and the last tick,
/// and joins them per plugin, in registry order.
pub async fn load(store: &dyn Store) -> Result<StatusReport, ReportError> {
    let keys = [
        REGISTRY_KEY.to_string(),
        COUNTERS_KEY.to_string(),
        OBSERVATIONS_KEY.to_string(),
        LAST_TICK_KEY.to_string(),
    ];
    let mut private = read_each(store, StoreKind::Private, &keys, 4)
        .await?
        .into_iter();
    let mut take = || private.next().unwrap_or(Ok(None));
    let ids = match take() {
        Ok(Some(e)) => parse_ids(&e.data).map_err(|e| ReportError::Registry(e.to_string()))?,
        Ok(None) => Vec::new(),
        Err(e) => return Err(ReportError::Registry(e.to_string())),
    };
    let counters: Result<HashMap<String, Counters>, String> = match take() {
        Ok(None) => Ok(HashMap::new()),
        Ok(Some(e)) => serde_json::from_slice(&e.data)
            .map_err(|err| format!("{COUNTERS_KEY} is not a counters object: {err}")),
        Err(e) => Err(e.to_string()),
    };
    let (observations, observations_error, obs) = match take() {
        Ok(None) => ("missing", None, None),
        Ok(Some(e)) => match decode(&e.data) {
            Ok(o) => ("present", None, Some(o)),
            Err(err) => ("unreadable", Some(err.to_string()), None),
        },
        Err(e) => ("unreadable", Some(e.to_string()), None),
    };
    let (last_tick, last_tick_error) = match take() {
        Ok(None) => (None, None),
        Ok(Some(e)) => match serde_json::from_slice::<LastTick>(&e.data) {
            Ok(l) => (Some(l), None),
            Err(err) => (
                None,
                Some(format!("{LAST_TICK_KEY} is not a last-tick record: {err}")),
            ),
        },
        Err(e) => (None, Some(e.to_string())),
    };

    let route_keys: Vec<String> = ids.iter().map(|id| route_key(id)).collect();
    let routes = read_each(store, StoreKind::Public, &route_keys, 16).await?;
    let plugins = ids
        .into_iter()
        .zip(routes)
        .map(|(plugin_id, route)| {
            let (status, error) = crate::route::shown_status(&plugin_id, route);
            let mut row = PluginRow {
                observation: observations,
                observation_error: observations_error.clone(),
                observed_tick: None,
                since: None,
                last_outcome: None,
                reported_status: None,
                error_kind: None,
                detail: None,
                consecutive_failures: None,
                counters_error: None,
                plugin_id,
                status,
                error,
            };
            match &counters {
                Ok(c) => {
                    row.consecutive_failures =
                        Some(c.get(&row.plugin_id).map_or(0, |c| c.failures));
                }
                Err(e) => row.counters_error = Some(e.clone()),
            }
            if let Some(o) = &obs {
                fill_observation(&mut row, o);
            }
            row
        })
        .collect();
    Ok(StatusReport {
        last_tick,
        last_tick_error,
        observations,
        observations_error,
        details_dropped: obs.as_ref().is_some_and(|o| o.details_dropped),
        plugins,
    })
}

/// The row's observation members from the stored record (`omitted` or `missing` when the
/// record has no entry for it).
fn fill_observation(row: &mut PluginRow, o: &Observations) {
    match o.plugins.get(&row.plugin_id) {
        None if o.omitted > 0 => row.observation = "omitted",
        None => row.observation = "missing",
        Some(k) => {
            row.observed_tick = Some(rfc3339(o.tick));
            row.since = Some(match k.since {
                Some(s) if row.status.as_deref() == Some(&*k.status) => rfc3339(s),
                _ => "unknown".into(),
            });
            row.last_outcome = Some(k.outcome.name().into());
            match &k.outcome {
                Outcome::Reported(s) => row.reported_status = Some(s.to_string()),
                Outcome::Failed { error_kind, detail } => {
                    row.error_kind = Some(error_kind.to_string());
                    row.detail = detail.as_deref().map(str::to_string);
                }
                Outcome::CutOff => {}
            }
        }
    }
}

fn or_dash(v: Option<&str>) -> String {
    v.map_or_else(|| "-".to_string(), escape_control)
}

/// What a row without an observation shows in its place.
pub fn no_observation(row: &PluginRow) -> String {
    match (row.observation, &row.observation_error) {
        ("unreadable", Some(e)) => format!("(observations unreadable: {})", escape_control(e)),
        ("omitted", _) => "(omitted: record over its size budget)".into(),
        _ => "(no observation)".into(),
    }
}

fn route_text(row: &PluginRow) -> String {
    match (&row.status, &row.error) {
        (Some(s), _) => escape_control(s),
        (None, Some(e)) => format!("(unreadable: {})", escape_control(e)),
        (None, None) => "(no route)".into(),
    }
}

fn outcome_text(row: &PluginRow) -> Option<String> {
    let o = row.last_outcome.as_deref()?;
    Some(match (&row.reported_status, &row.error_kind) {
        (Some(s), _) => format!("{o} {}", escape_control(s)),
        (None, Some(k)) => format!("{o} ({})", escape_control(k)),
        (None, None) => o.to_string(),
    })
}

fn failures_text(row: &PluginRow) -> String {
    match (row.consecutive_failures, &row.counters_error) {
        (Some(n), _) => n.to_string(),
        (None, _) => "(unreadable)".into(),
    }
}

/// `routes`' table: one line per plugin, control characters escaped.
pub fn render_table(report: &StatusReport) -> String {
    use std::fmt::Write;
    let rows: Vec<[String; 6]> = report
        .plugins
        .iter()
        .map(|r| {
            let none = no_observation(r);
            [
                escape_control(&r.plugin_id),
                route_text(r),
                r.since
                    .as_deref()
                    .map_or_else(|| none.clone(), escape_control),
                outcome_text(r).unwrap_or(none),
                failures_text(r),
                or_dash(r.detail.as_deref()),
            ]
        })
        .collect();
    let header = [
        "PLUGIN",
        "STATUS",
        "SINCE",
        "LAST PROBE",
        "FAILURES",
        "DETAIL",
    ];
    let mut widths = header.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 6]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i == 5 {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(header);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
    }
    out
}

/// `routes PLUGIN_ID`: one plugin in full, control characters escaped.
pub fn render_one(report: &StatusReport, row: &PluginRow) -> String {
    let none = no_observation(row);
    let last_tick = match (&report.last_tick, &report.last_tick_error) {
        (Some(t), _) => format!(
            "{} by {} at {}",
            escape_control(&t.tick),
            escape_control(&t.holder),
            escape_control(&t.completed_at)
        ),
        (None, Some(e)) => format!("(unreadable: {})", escape_control(e)),
        (None, None) => "(none recorded)".into(),
    };
    let fields = [
        ("plugin", escape_control(&row.plugin_id)),
        ("status", route_text(row)),
        (
            "since",
            row.since
                .as_deref()
                .map_or_else(|| none.clone(), escape_control),
        ),
        (
            "last probe",
            outcome_text(row).unwrap_or_else(|| none.clone()),
        ),
        ("reported status", or_dash(row.reported_status.as_deref())),
        ("error kind", or_dash(row.error_kind.as_deref())),
        (
            "consecutive failures",
            match (&row.consecutive_failures, &row.counters_error) {
                (Some(n), _) => n.to_string(),
                (None, Some(e)) => format!("(unreadable: {})", escape_control(e)),
                (None, None) => "(unreadable)".into(),
            },
        ),
        ("detail", or_dash(row.detail.as_deref())),
        (
            "observed at tick",
            row.observed_tick.as_deref().map_or(none, escape_control),
        ),
        ("last completed tick", last_tick),
    ];
    fields
        .iter()
        .map(|(k, v)| format!("{:<21} {v}\n", format!("{k}:")))
        .collect()
}

/// `text` with every control character (C0, DEL, C1) written as an escape, so a
/// plugin's own text cannot move the cursor, recolour or clear an operator's terminal.
pub fn escape_control(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// A record of `n` plugins like a large installation's, for the size checks (unit test
/// and benchmark): ids like `iot-device-hub-00042`, every since-time known and up to a
/// year old, 97 % healthy, 2 % failing with the transport's text, 1 % reporting an error
/// of their own with a detail of full length, each distinct.
#[doc(hidden)]
pub fn sample_record(n: usize, tick: i64) -> Observations {
    let seen: Vec<Seen> = (0..n)
        .map(|i| {
            let plugin_id = format!("iot-device-hub-{i:05}");
            let (status, outcome) = match i % 100 {
                0 | 1 => (
                    "FAILED",
                    Outcome::Failed {
                        error_kind: "connect".into(),
                        detail: Some(
                            "connection refused (tcp connect to 10.0.0.1:3500 failed: os error 111)"
                                .into(),
                        ),
                    },
                ),
                2 => (
                    "FAILED",
                    Outcome::Failed {
                        error_kind: "plugin_error".into(),
                        detail: Some(
                            format!(
                                "plugin reported ret -1: {i} {}",
                                "database unavailable ".repeat(8)
                            )
                            .into(),
                        ),
                    },
                ),
                _ => ("ACTIVE", Outcome::Reported("ACTIVE".into())),
            };
            Seen {
                plugin_id,
                status: status.into(),
                written: false,
                outcome,
            }
        })
        .collect();
    let mut obs = next(None, tick, "keel-scraper-7d9f8c6b5-x2k4q-1-ab12", &seen);
    for (i, kept) in obs.plugins.values_mut().enumerate() {
        let age = 31_536_000 - i64::try_from(i).unwrap_or(0);
        kept.since = Some(tick - age);
    }
    let _ = fit(&mut obs);
    obs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(id: &str, status: &str, written: bool, outcome: Outcome) -> Seen {
        Seen {
            plugin_id: id.into(),
            status: status.into(),
            written,
            outcome,
        }
    }

    #[test]
    fn the_rows_take_the_status_each_write_left_in_place_and_lose_the_gone_routes() {
        let mut rows = Recorder::with_capacity(4);
        for id in ["kept", "written", "gone", "reread"] {
            rows.push(
                id.to_string(),
                "ACTIVE".into(),
                &ProbeOutcome::Reported(crate::status::RouteStatus::Stopped),
            );
        }
        let after: HashMap<String, Option<(String, bool)>> = [
            ("written".to_string(), Some(("STOPPED".to_string(), true))),
            ("gone".to_string(), None),
            // Re-read after a conflict: another writer had already set it.
            ("reread".to_string(), Some(("STOPPED".to_string(), false))),
        ]
        .into_iter()
        .collect();
        let stopped = || Outcome::Reported("STOPPED".into());
        assert_eq!(
            super::seen(rows.finish(), &after),
            vec![
                seen("kept", "ACTIVE", false, stopped()),
                seen("written", "STOPPED", true, stopped()),
                seen("reread", "STOPPED", false, stopped()),
            ]
        );
    }

    /// `save`'s shortcut (encoding the merged entries without building the next map)
    /// writes what the full path writes and says the same about a change: within the
    /// budget, over it (a record that must drop details and entries), with a repeated id
    /// and with nothing changed.
    #[test]
    fn the_saved_encoding_is_the_full_paths() {
        let check = |prev: Option<Observations>, seen: Vec<Seen>, what: &str| {
            let (_, differs, data) = next_encoded(prev.clone(), 200, "h", seen.clone());
            let (merged, d, flags) = merge(prev, 200, seen);
            let (changed, shortcut, _) = encoded(merged, d, flags, 200, "h");
            assert_eq!((changed, shortcut), (differs, data), "{what}");
        };
        let ok = || Outcome::Reported("ACTIVE".into());
        let rows = vec![
            seen("b", "ACTIVE", false, ok()),
            seen("a", "STOPPED", true, Outcome::Reported("STOPPED".into())),
            seen(
                "c",
                "FAILED",
                false,
                failed("connect", "refused \"quoted\"\n"),
            ),
        ];
        check(None, rows.clone(), "first record");
        let first = next(None, 100, "h", &rows);
        check(Some(first.clone()), rows.clone(), "unchanged");
        let mut twice = rows.clone();
        twice.push(seen(
            "b",
            "STOPPED",
            true,
            Outcome::Reported("STOPPED".into()),
        ));
        check(Some(first), twice, "an id listed twice");
        // Distinct long details: far over the budget until they are dropped.
        let rows: Vec<Seen> = (0..20_000)
            .map(|i| {
                let detail = format!("{i:05} {}", "x".repeat(150));
                seen(
                    &format!("p{i:05}"),
                    "FAILED",
                    false,
                    failed("connect", &detail),
                )
            })
            .collect();
        let full = next(None, 1_000, "h", &rows);
        assert!(full.details_dropped, "the record had to drop its details");
        check(None, rows.clone(), "over the budget");
        let big = full;
        check(Some(big), rows, "over the budget, from a fitted record");
    }

    #[test]
    fn the_merge_takes_plugins_in_any_order_and_drops_those_not_seen() {
        let ok = || Outcome::Reported("ACTIVE".into());
        let first = next(
            None,
            100,
            "a",
            &[
                seen("c", "ACTIVE", false, ok()),
                seen("a", "ACTIVE", true, ok()),
                seen("b", "ACTIVE", true, ok()),
            ],
        );
        assert_eq!(
            first.plugins.keys().collect::<Vec<_>>(),
            ["a", "b", "c"],
            "kept in id order whatever order they came in"
        );
        // The same plugins in another order: nothing changed.
        let same = vec![
            seen("b", "ACTIVE", false, ok()),
            seen("c", "ACTIVE", false, ok()),
            seen("a", "ACTIVE", false, ok()),
        ];
        let (again, differs) = next_owned(Some(first.clone()), 110, "a", same);
        assert!(!differs);
        assert_eq!(again.plugins, first.plugins);
        // `b` unseen (first, middle and last position each), the others kept with their
        // since-times.
        for gone in ["a", "b", "c"] {
            let rest: Vec<Seen> = ["c", "b", "a"]
                .into_iter()
                .filter(|id| *id != gone)
                .map(|id| seen(id, "ACTIVE", false, ok()))
                .collect();
            let (after, differs) = next_owned(Some(first.clone()), 110, "a", rest);
            assert!(differs, "{gone} dropped");
            assert!(!after.plugins.contains_key(gone));
            for (id, kept) in &after.plugins {
                assert_eq!(kept.since, first.plugins[id].since, "{id}");
            }
        }
        // A new plugin beside the old ones changes the record.
        let more = vec![
            seen("a", "ACTIVE", false, ok()),
            seen("b", "ACTIVE", false, ok()),
            seen("bb", "ACTIVE", false, ok()),
            seen("c", "ACTIVE", false, ok()),
        ];
        let (after, differs) = next_owned(Some(first.clone()), 110, "a", more);
        assert!(differs);
        assert_eq!(after.plugins["bb"].since, None);
        assert_eq!(after.plugins["a"].since, Some(100));
    }

    fn failed(kind: &str, detail: &str) -> Outcome {
        Outcome::Failed {
            error_kind: kind.into(),
            detail: Some(detail.into()),
        }
    }

    #[test]
    fn since_is_the_first_tick_the_status_was_seen_else_unknown() {
        let ok = Outcome::Reported("ACTIVE".into());
        let first = next(
            None,
            100,
            "a",
            &[
                seen("old", "ACTIVE", false, ok.clone()),
                seen("new", "STOPPED", true, Outcome::Reported("STOPPED".into())),
            ],
        );
        assert_eq!(
            first.plugins["old"].since, None,
            "already ACTIVE when first seen"
        );
        assert_eq!(first.plugins["new"].since, Some(100), "written this tick");

        let second = next(
            Some(&first),
            110,
            "b",
            &[
                seen("old", "ACTIVE", false, ok.clone()),
                seen("new", "STOPPED", false, Outcome::Reported("STOPPED".into())),
            ],
        );
        assert_eq!(second.plugins["old"].since, None);
        assert_eq!(second.plugins["new"].since, Some(100), "carried over");
        assert!(
            !changed(Some(&first), &second),
            "nothing changed: no rewrite"
        );
        let again =
            |prev: &Observations, seen: Vec<Seen>| next_owned(Some(prev.clone()), 110, "b", seen).1;
        assert!(!again(
            &first,
            vec![
                seen("old", "ACTIVE", false, ok.clone()),
                seen("new", "STOPPED", false, Outcome::Reported("STOPPED".into())),
            ]
        ));
        assert!(
            again(&first, vec![seen("old", "ACTIVE", false, ok.clone())]),
            "a plugin dropping out is a change"
        );
        assert!(
            again(
                &first,
                vec![
                    seen("old", "ACTIVE", false, Outcome::CutOff),
                    seen("new", "STOPPED", false, Outcome::Reported("STOPPED".into())),
                ]
            ),
            "another outcome is a change"
        );

        // Someone else changed the route: this worker first saw the new status now.
        let third = next(
            Some(&second),
            120,
            "b",
            &[seen("old", "FAILED", false, failed("connect", "refused"))],
        );
        assert_eq!(third.plugins["old"].since, Some(120));
        assert!(
            !third.plugins.contains_key("new"),
            "unregistered plugins drop out"
        );
        assert!(changed(Some(&second), &third));
    }

    #[test]
    fn encode_and_decode_round_trip() {
        let obs = next(
            None,
            1_796_155_200,
            "pod-a",
            &[
                seen("a", "ACTIVE", false, Outcome::Reported("ACTIVE".into())),
                seen("b", "FAILED", true, failed("connect", "connection refused")),
                seen(
                    "c",
                    "FAILED",
                    false,
                    failed("connect", "connection refused"),
                ),
                seen("d", "FAILED", false, Outcome::Reported("ACTIVE".into())),
                seen("e", "ACTIVE", false, Outcome::CutOff),
            ],
        );
        let data = encode(&obs);
        let text = String::from_utf8(data.clone()).unwrap();
        assert_eq!(
            text.matches("connection refused").count(),
            1,
            "a detail is stored once: {text}"
        );
        assert!(text.contains(r#""tick":"2026-12-01T20:00:00Z""#), "{text}");
        assert_eq!(decode(&data).unwrap(), obs);
    }

    #[test]
    fn malformed_records_are_errors_naming_what_is_wrong() {
        for (data, needle) in [
            (&b"true"[..], "not a JSON object"),
            (br#"{"v":2}"#, "layout version 2"),
            (br#"{"v":1,"tick":"x","holder":"h","by_status":{}}"#, "tick"),
            (
                br#"{"v":1,"tick":"2026-12-01T20:00:00Z","holder":"h","by_status":{"FAILED":{"a":[0,"failed","connect",3]}}}"#,
                "detail index",
            ),
        ] {
            let err = decode(data).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn details_are_cut_to_160_characters() {
        let long = "é".repeat(500);
        let cut = cut_detail(&long);
        assert_eq!(cut.chars().count(), DETAIL_CHARS);
        assert!(cut.ends_with('…'));
        assert_eq!(cut_detail("short"), "short");
        let obs = next(
            None,
            0,
            "h",
            &[seen("a", "FAILED", true, failed("bad_body", &long))],
        );
        match &obs.plugins["a"].outcome {
            Outcome::Failed {
                detail: Some(d), ..
            } => assert_eq!(d.chars().count(), 160),
            other => panic!("{other:?}"),
        }
    }

    /// 50 000 plugins with realistic ids, most healthy, some blocked with distinct
    /// details of full length, every since-time known: under 2 MiB with nothing dropped.
    #[test]
    fn fifty_thousand_plugins_stay_under_two_mib() {
        let obs = sample_record(50_000, 1_764_619_200);
        let size = encode(&obs).len();
        assert!(size < MAX_BYTES, "{size} bytes");
        assert!(!obs.details_dropped && obs.omitted == 0, "nothing dropped");
        assert_eq!(obs.plugins.len(), 50_000);
    }

    /// Every plugin failing with its own long detail cannot fit: the record drops what it
    /// must and says so, and still stays under the limit.
    #[test]
    fn a_record_that_cannot_fit_drops_details_and_says_so() {
        let seen: Vec<Seen> = (0..50_000)
            .map(|i| {
                seen(
                    &format!("plugin-with-a-rather-long-identifier-{i:08}"),
                    "FAILED",
                    false,
                    failed("plugin_error", &format!("{i} {}", "x".repeat(200))),
                )
            })
            .collect();
        let obs = next(None, 1_764_619_200, "h", &seen);
        let data = encode(&obs);
        assert!(data.len() <= MAX_BYTES, "{}", data.len());
        assert!(obs.details_dropped);
        let back = decode(&data).unwrap();
        assert_eq!(back.plugins.len() as u64 + back.omitted, 50_000);
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            escape_control("\u{1b}[31mred\u{7}\n\u{9b}x"),
            "\\u{1b}[31mred\\u{7}\\n\\u{9b}x"
        );
    }
}
