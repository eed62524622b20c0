//! The calls of one request, as a graph: each upstream of each item starts
//! as soon as the answers it needs are in (not stage by stage), expands
//! into one call, one per list element, or one per chunk of a batch, and
//! identical calls are made once.
//!
//! It is plain state, driven by [`fan_out`](super::fan_out): [`Graph::ready`]
//! says which calls to start, [`Graph::deliver`] takes their results.

use crate::config::{MAX_CALLS, Route, RouteUpstream};
use crate::errors::UpstreamFailure;
use crate::merge::Outcome;
use crate::template::{self, Answers, Params};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};

/// What one waiting unit of work is for.
#[derive(Debug, Clone)]
enum Slot {
    /// The upstream's one call.
    Whole,
    /// One element of its list.
    Element(usize),
    /// Several elements of its list in one batch call: (element, id).
    Chunk(Vec<(usize, String)>),
}

#[derive(Debug)]
struct Waiter {
    item: usize,
    node: usize,
    slot: Slot,
}

/// One call to make, and who waits for it.
#[derive(Debug)]
pub struct Call {
    /// The upstream's index in the route.
    pub node: usize,
    /// Where.
    pub url: String,
    waiters: Vec<Waiter>,
    /// Its result, once in, for a waiter that comes later.
    result: Option<Result<Value, UpstreamFailure>>,
}

/// One upstream of one item.
#[derive(Debug, Default)]
struct Run {
    /// Calls it still waits for.
    pending: usize,
    started: bool,
    done: bool,
    /// Why it failed as a whole.
    failure: Option<UpstreamFailure>,
    /// Its answer (one call).
    whole: Option<Result<Value, UpstreamFailure>>,
    /// Its answers (a list): one per element.
    elements: Option<Vec<Option<Result<Value, UpstreamFailure>>>>,
    /// What other upstreams read of it: its answer, or the list of its
    /// elements' answers (`null` for a failed one).
    value: Option<Value>,
    /// Whether `whole` is already shaped.
    shaped: bool,
}

/// The state of one request's calls.
pub struct Graph<'r> {
    route: &'r Route,
    items: &'r [Params],
    runs: Vec<Vec<Run>>,
    /// For each upstream, those that read its answer.
    dependents: Vec<Vec<usize>>,
    ready: VecDeque<(usize, usize)>,
    calls: Vec<Call>,
    by_url: HashMap<(usize, String), usize>,
    queue: VecDeque<usize>,
}

impl<'r> Graph<'r> {
    /// The graph for `items` of `route`; the upstreams that need no
    /// answer are ready.
    pub fn new(route: &'r Route, items: &'r [Params]) -> Graph<'r> {
        let n = route.upstreams.len();
        let mut dependents = vec![Vec::new(); n];
        for (i, upstream) in route.upstreams.iter().enumerate() {
            for &on in &upstream.depends_on {
                dependents[on].push(i);
            }
        }
        let mut ready = VecDeque::new();
        for item in 0..items.len() {
            for (node, upstream) in route.upstreams.iter().enumerate() {
                if upstream.depends_on.is_empty() {
                    ready.push_back((item, node));
                }
            }
        }
        Graph {
            route,
            items,
            runs: (0..items.len())
                .map(|_| (0..n).map(|_| Run::default()).collect())
                .collect(),
            dependents,
            ready,
            calls: Vec::new(),
            by_url: HashMap::new(),
            queue: VecDeque::new(),
        }
    }

    /// The next call to start, in the order the calls became known.
    pub fn next_call(&mut self) -> Option<(usize, &Call)> {
        while let Some((item, node)) = self.ready.pop_front() {
            self.expand(item, node);
        }
        let id = self.queue.pop_front()?;
        Some((id, &self.calls[id]))
    }

    /// How many distinct calls were made or asked for.
    pub fn calls_made(&self) -> usize {
        self.calls.len()
    }

    /// Turns an upstream of an item whose inputs are in into calls.
    fn expand(&mut self, item: usize, node: usize) {
        let route = self.route;
        let upstream = &route.upstreams[node];
        self.runs[item][node].started = true;
        for &on in &upstream.depends_on {
            if self.runs[item][on].failure.is_some() || self.whole_failed(item, on) {
                let why = format!("{} failed", route.upstreams[on].name);
                return self.fail(item, node, UpstreamFailure::NotCalled(why));
            }
        }
        let runs = &self.runs[item];
        let read = |i: usize| runs[i].value.as_ref();
        let answers = Answers {
            upstream: &read,
            element: None,
        };
        let params = &self.items[item];
        let Some((source, path)) = &upstream.each else {
            match upstream.url.render_with(params, &answers) {
                Ok(url) => self.wait_for(node, url, item, Slot::Whole),
                Err(why) => return self.fail(item, node, UpstreamFailure::NotCalled(why)),
            }
            return self.finish_if_done(item, node);
        };
        let list_name = || format!("{}.{}", route.upstreams[*source].name, path.display());
        let list = match runs[*source].value.as_ref().map(|v| path.each(v)) {
            Some(Ok(list)) => list,
            Some(Err(why)) => {
                let why = format!("{} {why}", list_name());
                return self.fail(item, node, UpstreamFailure::NotCalled(why));
            }
            None => {
                let why = format!("{} is missing", list_name());
                return self.fail(item, node, UpstreamFailure::NotCalled(why));
            }
        };
        if list.len() > upstream.max_items {
            let why = format!(
                "{} has {} elements; at most {} are allowed (max_items)",
                list_name(),
                list.len(),
                upstream.max_items
            );
            return self.fail(item, node, UpstreamFailure::NotCalled(why));
        }
        let mut elements: Vec<Option<Result<Value, UpstreamFailure>>> = vec![None; list.len()];
        let mut units: Vec<(String, Slot)> = Vec::new();
        match &upstream.batch {
            None => {
                for (i, element) in list.iter().enumerate() {
                    let answers = Answers {
                        upstream: &read,
                        element: *element,
                    };
                    match upstream.url.render_with(params, &answers) {
                        Ok(url) => units.push((url, Slot::Element(i))),
                        Err(why) => elements[i] = Some(Err(UpstreamFailure::NotCalled(why))),
                    }
                }
            }
            Some(batch) => {
                let base = match upstream.url.render_with(params, &answers) {
                    Ok(url) => url,
                    Err(why) => return self.fail(item, node, UpstreamFailure::NotCalled(why)),
                };
                // Distinct ids in first-seen order, and each element's
                // chunk: by map, as a list of a thousand would otherwise
                // cost a million comparisons (in fuel).
                let mut ids: Vec<String> = Vec::new();
                let mut index: HashMap<String, usize> = HashMap::new();
                let mut members: Vec<Vec<(usize, String)>> = Vec::new();
                for (i, element) in list.iter().enumerate() {
                    match template::scalar(*element) {
                        Ok(id) => {
                            let at = *index.entry(id.clone()).or_insert_with(|| {
                                ids.push(id.clone());
                                ids.len() - 1
                            });
                            let chunk = at / batch.max;
                            if members.len() <= chunk {
                                members.resize_with(chunk + 1, Vec::new);
                            }
                            members[chunk].push((i, id));
                        }
                        Err(why) => {
                            let why = format!("element {i} of {} {why}", list_name());
                            elements[i] = Some(Err(UpstreamFailure::NotCalled(why)));
                        }
                    }
                }
                for (chunk, members) in ids.chunks(batch.max).zip(members) {
                    let mut url = base.clone();
                    url.push(if url.contains('?') { '&' } else { '?' });
                    url.push_str(&batch.param);
                    url.push('=');
                    for (j, id) in chunk.iter().enumerate() {
                        if j > 0 {
                            url.push(',');
                        }
                        template::encode(&mut url, id);
                    }
                    units.push((url, Slot::Chunk(members)));
                }
            }
        }
        self.runs[item][node].elements = Some(elements);
        for (url, slot) in units {
            self.wait_for(node, url, item, slot);
        }
        self.finish_if_done(item, node);
    }

    fn whole_failed(&self, item: usize, node: usize) -> bool {
        matches!(self.runs[item][node].whole, Some(Err(_)))
    }

    /// Makes `item`'s `node` wait for the call to `url`: a new call, one
    /// already asked for, or one already answered.
    fn wait_for(&mut self, node: usize, url: String, item: usize, slot: Slot) {
        let waiter = Waiter { item, node, slot };
        let key = (node, url);
        if let Some(&id) = self.by_url.get(&key) {
            self.runs[item][node].pending += 1;
            match &self.calls[id].result {
                Some(result) => {
                    let result = result.clone();
                    self.settle(waiter, result);
                }
                None => self.calls[id].waiters.push(waiter),
            }
            return;
        }
        if self.calls.len() >= MAX_CALLS {
            let why = format!("the request reached its limit of {MAX_CALLS} upstream calls");
            self.runs[item][node].pending += 1;
            self.settle(waiter, Err(UpstreamFailure::NotCalled(why)));
            return;
        }
        let id = self.calls.len();
        self.by_url.insert(key.clone(), id);
        self.calls.push(Call {
            node,
            url: key.1,
            waiters: Vec::new(),
            result: None,
        });
        self.runs[item][node].pending += 1;
        self.calls[id].waiters.push(waiter);
        self.queue.push_back(id);
    }

    /// Takes the result of call `id` to everyone waiting for it.
    pub fn deliver(&mut self, id: usize, result: Result<Value, UpstreamFailure>) {
        let waiters = std::mem::take(&mut self.calls[id].waiters);
        // Answers are trees of small allocations, and copying them was most
        // of a large list's fuel: the last waiter takes the answer itself.
        // Only an upstream that reads another's answer can ask for a call
        // already answered (the others all ask before the first call
        // starts), so only its calls keep a copy.
        if !self.route.upstreams[self.calls[id].node]
            .depends_on
            .is_empty()
        {
            self.calls[id].result = Some(result.clone());
        }
        let mut result = Some(result);
        let last = waiters.len().saturating_sub(1);
        for (n, waiter) in waiters.into_iter().enumerate() {
            let (item, node) = (waiter.item, waiter.node);
            let this = match n == last {
                true => result.take(),
                false => result.clone(),
            };
            if let Some(this) = this {
                self.settle(waiter, this);
            }
            self.finish_if_done(item, node);
        }
    }

    /// Records one call's result for one waiter.
    fn settle(&mut self, waiter: Waiter, result: Result<Value, UpstreamFailure>) {
        let run = &mut self.runs[waiter.item][waiter.node];
        run.pending -= 1;
        let object = |result: Result<Value, UpstreamFailure>| match result {
            Ok(Value::Object(_)) | Err(_) => result,
            Ok(_) => Err(UpstreamFailure::InvalidBody("not a JSON object".into())),
        };
        match waiter.slot {
            Slot::Whole => run.whole = Some(object(result)),
            Slot::Element(i) => {
                if let Some(slot) = run.elements.as_mut().and_then(|e| e.get_mut(i)) {
                    *slot = Some(object(result));
                }
            }
            Slot::Chunk(members) => {
                let key = &self.route.upstreams[waiter.node]
                    .batch
                    .as_ref()
                    .expect("a chunk is of a batch")
                    .key;
                let Some(elements) = run.elements.as_mut() else {
                    return;
                };
                let mut answers = result.map(|answer| BatchAnswer::index(answer, key, &members));
                for (i, id) in members {
                    let found = match &mut answers {
                        Err(failure) => Err(failure.clone()),
                        Ok(answers) => answers.take(&id),
                    };
                    if let Some(slot) = elements.get_mut(i) {
                        *slot = Some(found);
                    }
                }
            }
        }
    }

    fn fail(&mut self, item: usize, node: usize, failure: UpstreamFailure) {
        self.runs[item][node].failure = Some(failure);
        self.finish_if_done(item, node);
    }

    /// Once an upstream of an item has all its answers, it is done, and
    /// those that read it may be ready.
    fn finish_if_done(&mut self, item: usize, node: usize) {
        let run = &mut self.runs[item][node];
        if run.done || run.pending > 0 || !run.started {
            return;
        }
        run.done = true;
        // Only what another upstream reads is kept twice.
        if self.dependents[node].is_empty() {
            return;
        }
        let shape = &self.route.upstreams[node].shape;
        run.value = match (&run.failure, &mut run.whole, &run.elements) {
            (Some(_), _, _) => None,
            // The raw answer for those that read it, the shaped one for the
            // item: one copy at most, of only what `select` keeps.
            (None, Some(Ok(value)), _) => {
                let shaped = shape.apply_ref(value);
                run.shaped = true;
                Some(std::mem::replace(value, shaped))
            }
            (None, _, Some(elements)) => Some(Value::Array(
                elements
                    .iter()
                    .map(|e| match e {
                        Some(Ok(value)) => value.clone(),
                        _ => Value::Null,
                    })
                    .collect(),
            )),
            _ => None,
        };
        for &next in &self.dependents[node] {
            let deps = &self.route.upstreams[next].depends_on;
            if deps.iter().all(|&d| self.runs[item][d].done) {
                self.ready.push_back((item, next));
            }
        }
    }

    /// Each item's outcomes, in route order, shaped for merging.
    pub fn outcomes(&mut self, item: usize) -> Vec<Outcome<'r>> {
        let route = self.route;
        route
            .upstreams
            .iter()
            .zip(self.runs[item].iter_mut())
            .map(|(upstream, run)| outcome(upstream, run))
            .collect()
    }
}

fn outcome<'r>(upstream: &'r RouteUpstream, run: &mut Run) -> Outcome<'r> {
    let mut failed_elements = Vec::new();
    let result = match (run.failure.take(), run.whole.take(), run.elements.take()) {
        (Some(failure), _, _) => Err(failure),
        (None, Some(result), _) if run.shaped => result,
        (None, Some(result), _) => result.map(|v| upstream.shape.apply(v)),
        (None, None, Some(elements)) => Ok(Value::Array(
            elements
                .into_iter()
                .enumerate()
                .map(|(i, element)| match element {
                    Some(Ok(value)) => upstream.shape.apply(value),
                    Some(Err(failure)) => {
                        failed_elements.push((i, failure));
                        Value::Null
                    }
                    None => {
                        let why = "no answer".to_string();
                        failed_elements.push((i, UpstreamFailure::NotCalled(why)));
                        Value::Null
                    }
                })
                .collect(),
        )),
        // Never left unfinished by the graph; say so rather than panic.
        (None, None, None) => Err(UpstreamFailure::NotCalled("its inputs never came".into())),
    };
    Outcome {
        upstream: &upstream.name,
        field: &upstream.field,
        required: upstream.required,
        result,
        failed_elements,
    }
}

/// A batch answer by id: a list of objects naming their id at the batch's
/// `key`, or an object keyed by id, taken apart for the elements that wait
/// for it.
struct BatchAnswer {
    by_id: HashMap<String, Value>,
    /// How many elements still want each id: the last one takes the entry
    /// rather than a copy.
    wanted: HashMap<String, usize>,
}

impl BatchAnswer {
    /// Takes `answer` apart by id, for `members`.
    fn index(
        answer: Value,
        key: &crate::shape::JsonPath,
        members: &[(usize, String)],
    ) -> BatchAnswer {
        let by_id: HashMap<String, Value> = match answer {
            Value::Array(list) => {
                let mut by_id = HashMap::with_capacity(list.len());
                for entry in list {
                    if let Ok(id) = template::scalar(key.get(&entry)) {
                        by_id.entry(id).or_insert(entry);
                    }
                }
                by_id
            }
            Value::Object(map) => map.into_iter().collect(),
            _ => HashMap::new(),
        };
        let mut wanted = HashMap::with_capacity(members.len());
        for (_, id) in members {
            *wanted.entry(id.clone()).or_insert(0) += 1;
        }
        BatchAnswer { by_id, wanted }
    }

    /// The answer for `id`; none is a 404 for that id.
    fn take(&mut self, id: &str) -> Result<Value, UpstreamFailure> {
        let last = match self.wanted.get_mut(id) {
            Some(count) => {
                *count = count.saturating_sub(1);
                *count == 0
            }
            None => true,
        };
        let found = match last {
            true => self.by_id.remove(id),
            false => self.by_id.get(id).cloned(),
        };
        match found {
            Some(value @ Value::Object(_)) => Ok(value),
            Some(_) => Err(UpstreamFailure::InvalidBody(format!(
                "the entry for {id} is not a JSON object"
            ))),
            None => Err(UpstreamFailure::Status(404)),
        }
    }
}

#[cfg(test)]
mod tests;
