//! Paths into JSON answers (`order.lines[].sku`) and the shaping of an
//! upstream's answer before it is merged: `select` keeps only some paths,
//! `rename` moves values.

use serde_json::{Map, Value};

/// One step of a [`JsonPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// An object's member, or an array's element when the key is a number.
    Key(String),
    /// An object's member that is a list, each element in turn (`lines[]`).
    Each(String),
}

/// A path into a JSON value: keys separated by `.`, a key followed by `[]`
/// for each element of a list (`lines[].sku`), a number for one element
/// (`lines.0.sku`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JsonPath {
    steps: Vec<Step>,
}

impl JsonPath {
    /// Parses `a.b[].c`; `max_each` is how many `[]` it may have.
    pub fn parse(raw: &str, max_each: usize) -> Result<JsonPath, String> {
        let mut steps = Vec::new();
        for part in raw.split('.') {
            let (key, each) = match part.strip_suffix("[]") {
                Some(key) => (key, true),
                None => (part, false),
            };
            let valid = !key.is_empty()
                && key.len() <= 64
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                return Err(format!(
                    "`{raw}`: each step is 1 to 64 of A-Z, a-z, 0-9, '_', '-', \
                     optionally followed by [] (`{part}` is not)"
                ));
            }
            steps.push(match each {
                true => Step::Each(key.to_string()),
                false => Step::Key(key.to_string()),
            });
        }
        let lists = steps.iter().filter(|s| matches!(s, Step::Each(_))).count();
        if lists > max_each {
            return Err(match max_each {
                0 => format!("`{raw}`: [] is not allowed here"),
                n => format!("`{raw}`: at most {n} [] here"),
            });
        }
        Ok(JsonPath { steps })
    }

    /// The steps.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Whether it goes through a list (`[]`).
    pub fn has_list(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::Each(_)))
    }

    /// The path as written.
    pub fn display(&self) -> String {
        let mut out = String::new();
        for (i, step) in self.steps.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            match step {
                Step::Key(key) => out.push_str(key),
                Step::Each(key) => {
                    out.push_str(key);
                    out.push_str("[]");
                }
            }
        }
        out
    }

    /// The path's first key and the rest: a reference's upstream and the
    /// path in its answer.
    pub fn split_first(&self) -> Option<(&str, JsonPath)> {
        match self.steps.first()? {
            Step::Key(first) => Some((
                first,
                JsonPath {
                    steps: self.steps[1..].to_vec(),
                },
            )),
            Step::Each(_) => None,
        }
    }

    /// The value at a path without `[]`.
    pub fn get<'v>(&self, value: &'v Value) -> Option<&'v Value> {
        self.steps.iter().try_fold(value, |v, step| match step {
            Step::Key(key) => member(v, key),
            Step::Each(_) => None,
        })
    }

    /// The values a path with one `[]` reaches, in the list's order; `Err`
    /// says why there is no list. An element without the rest of the path
    /// is `None`.
    pub fn each<'v>(&self, value: &'v Value) -> Result<Vec<Option<&'v Value>>, String> {
        let at = self
            .steps
            .iter()
            .position(|s| matches!(s, Step::Each(_)))
            .ok_or("no [] in the path")?;
        let Step::Each(key) = &self.steps[at] else {
            unreachable!("found above")
        };
        let mut head = self.steps[..at].to_vec();
        head.push(Step::Key(key.clone()));
        let list = JsonPath { steps: head }
            .get(value)
            .ok_or_else(|| "is missing".to_string())?
            .as_array()
            .ok_or_else(|| "is not a list".to_string())?;
        let rest = JsonPath {
            steps: self.steps[at + 1..].to_vec(),
        };
        Ok(list.iter().map(|element| rest.get(element)).collect())
    }

    /// Copies what this path reaches in `from` into `to`, building the
    /// objects and lists on the way; a missing part copies nothing.
    fn pick(steps: &[Step], from: &Value, to: &mut Value) {
        let Some((step, rest)) = steps.split_first() else {
            *to = from.clone();
            return;
        };
        match step {
            Step::Key(key) => {
                let Some(inner) = member(from, key) else {
                    return;
                };
                if let Value::Array(_) = from {
                    // A numbered element: keep the list's shape up to it.
                    let Ok(index) = key.parse::<usize>() else {
                        return;
                    };
                    if !to.is_array() {
                        *to = Value::Array(Vec::new());
                    }
                    let list = to.as_array_mut().expect("made a list above");
                    if list.len() <= index {
                        list.resize(index + 1, Value::Null);
                    }
                    JsonPath::pick(rest, inner, &mut list[index]);
                    return;
                }
                let slot = object(to).entry(key.clone()).or_insert(Value::Null);
                JsonPath::pick(rest, inner, slot);
            }
            Step::Each(key) => {
                let Some(Value::Array(list)) = member(from, key) else {
                    return;
                };
                let slot = object(to).entry(key.clone()).or_insert(Value::Null);
                if !matches!(slot, Value::Array(existing) if existing.len() == list.len()) {
                    *slot = Value::Array(vec![Value::Null; list.len()]);
                }
                let Value::Array(out) = slot else {
                    unreachable!("made a list above")
                };
                for (element, out) in list.iter().zip(out) {
                    JsonPath::pick(rest, element, out);
                }
            }
        }
    }

    /// Takes the value at this path out of `value`.
    fn take(&self, value: &mut Value) -> Option<Value> {
        let (last, parents) = self.steps.split_last()?;
        let mut at = value;
        for step in parents {
            let Step::Key(key) = step else { return None };
            at = at.as_object_mut()?.get_mut(key)?;
        }
        let Step::Key(key) = last else { return None };
        at.as_object_mut()?.remove(key)
    }

    /// Puts `new` at this path in `value`, making the objects on the way.
    fn put(&self, value: &mut Value, new: Value) {
        let Some((last, parents)) = self.steps.split_last() else {
            return;
        };
        let mut at = value;
        for step in parents {
            let Step::Key(key) = step else { return };
            at = object(at).entry(key.clone()).or_insert(Value::Null);
        }
        if let Step::Key(key) = last {
            object(at).insert(key.clone(), new);
        }
    }
}

/// `value[key]`: an object's member, or a list's numbered element.
fn member<'v>(value: &'v Value, key: &str) -> Option<&'v Value> {
    match value {
        Value::Object(map) => map.get(key),
        Value::Array(list) => list.get(key.parse::<usize>().ok()?),
        _ => None,
    }
}

/// `value` as an object, replacing whatever else it was.
fn object(value: &mut Value) -> &mut Map<String, Value> {
    if !value.is_object() {
        *value = Value::Object(Map::new());
    }
    match value {
        Value::Object(map) => map,
        _ => unreachable!("made an object above"),
    }
}

/// How an upstream's answer is reshaped before it is merged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shape {
    /// Keep only these paths (all if empty).
    pub select: Vec<JsonPath>,
    /// Then move the value at each first path to the second.
    pub rename: Vec<(JsonPath, JsonPath)>,
}

impl Shape {
    /// Whether it changes nothing.
    pub fn is_identity(&self) -> bool {
        self.select.is_empty() && self.rename.is_empty()
    }

    /// Applies the shape to a copy of one answer, copying only what
    /// `select` keeps.
    pub fn apply_ref(&self, value: &Value) -> Value {
        if self.select.is_empty() {
            return self.apply(value.clone());
        }
        let mut picked = Value::Object(Map::new());
        for path in &self.select {
            JsonPath::pick(&path.steps, value, &mut picked);
        }
        self.rename(picked)
    }

    /// Applies the shape to one answer.
    pub fn apply(&self, value: Value) -> Value {
        if self.is_identity() {
            return value;
        }
        let shaped = if self.select.is_empty() {
            value
        } else {
            let mut picked = Value::Object(Map::new());
            for path in &self.select {
                JsonPath::pick(&path.steps, &value, &mut picked);
            }
            picked
        };
        self.rename(shaped)
    }

    fn rename(&self, mut shaped: Value) -> Value {
        for (from, to) in &self.rename {
            if let Some(moved) = from.take(&mut shaped) {
                to.put(&mut shaped, moved);
            }
        }
        shaped
    }
}

#[cfg(test)]
mod tests;
