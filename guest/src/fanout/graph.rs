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
        let list: Vec<Option<Value>> = list.into_iter().map(|v| v.cloned()).collect();
        let mut elements: Vec<Option<Result<Value, UpstreamFailure>>> = vec![None; list.len()];
        let mut units: Vec<(String, Slot)> = Vec::new();
        match &upstream.batch {
            None => {
                for (i, element) in list.iter().enumerate() {
                    let answers = Answers {
                        upstream: &read,
                        element: element.as_ref(),
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
                // Distinct ids in first-seen order, each element with its id.
                let mut ids: Vec<String> = Vec::new();
                let mut of_element: Vec<(usize, String)> = Vec::new();
                for (i, element) in list.iter().enumerate() {
                    match template::scalar(element.as_ref()) {
                        Ok(id) => {
                            if !ids.contains(&id) {
                                ids.push(id.clone());
                            }
                            of_element.push((i, id));
                        }
                        Err(why) => {
                            let why = format!("element {i} of {} {why}", list_name());
                            elements[i] = Some(Err(UpstreamFailure::NotCalled(why)));
                        }
                    }
                }
                for chunk in ids.chunks(batch.max) {
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
                    let members = of_element
                        .iter()
                        .filter(|(_, id)| chunk.contains(id))
                        .cloned()
                        .collect();
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
            match self.calls[id].result.clone() {
                Some(result) => {
                    self.runs[item][node].pending += 1;
                    self.settle(waiter, &result);
                }
                None => {
                    self.runs[item][node].pending += 1;
                    self.calls[id].waiters.push(waiter);
                }
            }
            return;
        }
        if self.calls.len() >= MAX_CALLS {
            let why = format!("the request reached its limit of {MAX_CALLS} upstream calls");
            self.runs[item][node].pending += 1;
            self.settle(waiter, &Err(UpstreamFailure::NotCalled(why)));
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
        for waiter in waiters {
            let (item, node) = (waiter.item, waiter.node);
            self.settle(waiter, &result);
            self.finish_if_done(item, node);
        }
        self.calls[id].result = Some(result);
    }

    /// Records one call's result for one waiter.
    fn settle(&mut self, waiter: Waiter, result: &Result<Value, UpstreamFailure>) {
        let run = &mut self.runs[waiter.item][waiter.node];
        run.pending -= 1;
        let object = |result: &Result<Value, UpstreamFailure>| match result {
            Ok(Value::Object(_)) | Err(_) => result.clone(),
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
                for (i, id) in members {
                    let found = match result {
                        Err(failure) => Err(failure.clone()),
                        Ok(answer) => split_batch(answer, key, &id),
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
        run.value = match (&run.failure, &run.whole, &run.elements) {
            (Some(_), _, _) => None,
            (None, Some(Ok(value)), _) => Some(value.clone()),
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

/// The answer for `id` in a batch answer: a list of objects naming their
/// id at `key`, or an object keyed by id. Missing: a 404 for that id.
fn split_batch(
    answer: &Value,
    key: &crate::shape::JsonPath,
    id: &str,
) -> Result<Value, UpstreamFailure> {
    let found = match answer {
        Value::Array(list) => list
            .iter()
            .find(|entry| template::scalar(key.get(entry)).is_ok_and(|k| k == id)),
        Value::Object(map) => map.get(id),
        _ => None,
    };
    match found {
        Some(value @ Value::Object(_)) => Ok(value.clone()),
        Some(_) => Err(UpstreamFailure::InvalidBody(format!(
            "the entry for {id} is not a JSON object"
        ))),
        None => Err(UpstreamFailure::Status(404)),
    }
}

#[cfg(test)]
mod tests;
