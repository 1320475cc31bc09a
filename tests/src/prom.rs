//! Parsing the Prometheus text format the agent serves, to assert on numbers.

use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    labels
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("malformed line {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => {
                    (name.to_string(), parse_labels(labels.trim_end_matches('}')))
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        Scrape { samples }
    }

    /// Samples named `name` whose labels include every pair of `matchers`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        matchers: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && matchers
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum over the matching samples.
    pub fn sum(&self, name: &str, matchers: &[(&str, &str)]) -> f64 {
        self.find(name, matchers).map(|s| s.value).sum()
    }

    /// The value of a label across matching samples, deduplicated.
    pub fn label_values(
        &self,
        name: &str,
        matchers: &[(&str, &str)],
        label: &str,
    ) -> std::collections::BTreeSet<String> {
        self.find(name, matchers)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_with_escapes_and_special_values() {
        let s = Scrape::parse(
            "# HELP x y\nm{a=\"1\",b=\"q\\\"x,y\"} 2.5\nh_bucket{le=\"+Inf\"} 3\nplain +Inf\n",
        );
        assert_eq!(s.samples.len(), 3);
        assert_eq!(s.samples[0].labels["b"], "q\"x,y");
        assert_eq!(s.sum("m", &[("a", "1")]), 2.5);
        assert_eq!(s.samples[2].value, f64::INFINITY);
    }
}
