//! The lead-import guard: `POST /campaigns/{id}/leads` is checked before it spends any
//! quota, and with `leads.auto_batch` an import over `leads.max_per_request` is split
//! into batches whose answers are merged into one.

use bytes::Bytes;
use email_address::{EmailAddress, Options};
use http::{Method, StatusCode};
use serde_json::{Map, Value, json};

use crate::config::LeadsSettings;

/// A lead import refused before anything was sent, in SmartLead's own terms: the field
/// at fault and the constraint it broke.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// `lead_list[2].email`.
    pub field: String,
    /// `required`, `format`, `type`, `json` or `max_items`.
    pub constraint: &'static str,
    pub message: String,
    /// For `max_items`: the most allowed, and how many there were.
    pub too_many: Option<(usize, usize)>,
}

/// What to do with a lead import.
#[derive(Debug)]
pub enum Plan {
    /// Send it as it is.
    Forward,
    /// Send these bodies one after the other and merge the answers.
    Batches(Vec<Batch>),
}

/// One part of a split import: its body and which leads of the original it carries.
#[derive(Debug)]
pub struct Batch {
    pub body: Bytes,
    /// Index of its first lead in the original `lead_list`.
    pub first: usize,
    pub count: usize,
}

/// `POST /campaigns/{id}/leads` (the path below `/api/v1`, a trailing slash allowed).
/// Names are compared as an upstream router may: without regard to case, and with
/// percent-escapes decoded (`/Campaigns/1/%6Ceads` is an import too).
pub fn is_import(method: &Method, api_path: &str) -> bool {
    if method != Method::POST {
        return false;
    }
    let path = api_path.strip_suffix('/').unwrap_or(api_path);
    let mut parts = path.split('/');
    let is = |segment: &str, name: &str| {
        percent_encoding::percent_decode_str(segment)
            .decode_utf8_lossy()
            .eq_ignore_ascii_case(name)
    };
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(""), Some(c), Some(id), Some(l), None)
            if is(c, "campaigns") && is(l, "leads") && !id.is_empty()
    )
}

/// Leads that passed validation but will render blanks where a sequence personalises
/// (`{{first_name}}`): reported, never refused.
#[derive(Debug, Default, PartialEq)]
pub struct Warnings {
    /// Each field of `leads.warn_missing` some lead lacks, with those leads' positions.
    pub missing: Vec<(String, Vec<usize>)>,
}

impl Warnings {
    /// Finds leads without a field (absent, null or blank); `None` when all have them.
    pub fn find(fields: &[String], leads: &[Value]) -> Option<Self> {
        let missing: Vec<(String, Vec<usize>)> = fields
            .iter()
            .map(|f| f.trim())
            .filter(|f| !f.is_empty())
            .filter_map(|field| {
                let without: Vec<usize> = leads
                    .iter()
                    .enumerate()
                    .filter(|(_, lead)| lacks(lead, field))
                    .map(|(i, _)| i)
                    .collect();
                (!without.is_empty()).then(|| (field.to_owned(), without))
            })
            .collect();
        (!missing.is_empty()).then_some(Self { missing })
    }

    /// `3 leads without first_name, 1 lead without company_name`.
    pub fn header(&self) -> String {
        self.missing
            .iter()
            .map(|(field, leads)| {
                let noun = if leads.len() == 1 { "lead" } else { "leads" };
                format!("{} {noun} without {field}", leads.len())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The first few positions per field, for the log: `first_name: lead_list[0], [4]`.
    pub fn positions(&self) -> String {
        const SHOWN: usize = 10;
        self.missing
            .iter()
            .map(|(field, leads)| {
                let mut shown: Vec<String> =
                    leads.iter().take(SHOWN).map(|i| format!("[{i}]")).collect();
                if leads.len() > SHOWN {
                    shown.push(format!("and {} more", leads.len() - SHOWN));
                }
                format!("{field}: lead_list{}", shown.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn lacks(lead: &Value, field: &str) -> bool {
    match lead.get(field) {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.trim().is_empty(),
        Some(_) => false,
    }
}

/// Checks an import body and decides how to send it, with warnings about leads that
/// passed. `Err` is the 400 answer.
pub fn plan(settings: &LeadsSettings, body: &[u8]) -> Result<(Plan, Option<Warnings>), Refusal> {
    if !settings.validate && !settings.auto_batch {
        return Ok((Plan::Forward, None));
    }
    let parsed: Option<Map<String, Value>> = serde_json::from_slice(body).ok();
    let Some(mut object) = parsed else {
        return if settings.validate {
            Err(invalid(
                "body",
                "json",
                "the body must be a JSON object with a lead_list array",
            ))
        } else {
            Ok((Plan::Forward, None))
        };
    };
    let leads = match object.remove("lead_list") {
        Some(Value::Array(leads)) => leads,
        _ if !settings.validate => return Ok((Plan::Forward, None)),
        None | Some(Value::Null) => {
            return Err(invalid("lead_list", "required", "lead_list is required"));
        }
        Some(_) => return Err(invalid("lead_list", "type", "lead_list must be an array")),
    };
    let mut warnings = None;
    if settings.validate {
        check_leads(&leads)?;
        warnings = Warnings::find(&settings.warn_missing, &leads);
    }
    let max = settings.max_per_request;
    if leads.len() <= max {
        return Ok((Plan::Forward, warnings));
    }
    if !settings.auto_batch {
        let mut refusal = invalid(
            "lead_list",
            "max_items",
            format!(
                "at most {max} leads per request, this one has {} (leads.max_per_request; \
                 leads.auto_batch = true splits it for you)",
                leads.len()
            ),
        );
        refusal.too_many = Some((max, leads.len()));
        return Err(refusal);
    }
    Ok((Plan::Batches(split(object, leads, max)), warnings))
}

/// Every lead is an object with a syntactically valid `email`; the first failure is
/// reported with its position.
fn check_leads(leads: &[Value]) -> Result<(), Refusal> {
    // As SmartLead needs it: user@domain.tld, no display names or IP literals.
    let options = Options::default()
        .with_required_tld()
        .without_display_text()
        .without_domain_literal();
    for (i, lead) in leads.iter().enumerate() {
        let Some(lead) = lead.as_object() else {
            return Err(invalid(
                &format!("lead_list[{i}]"),
                "type",
                format!("lead_list[{i}] must be an object"),
            ));
        };
        let field = format!("lead_list[{i}].email");
        let email = match lead.get("email") {
            Some(Value::String(e)) if !e.trim().is_empty() => e,
            _ => {
                let message = format!("{field} is required: every lead needs an email");
                return Err(invalid(&field, "required", message));
            }
        };
        if EmailAddress::parse_with_options(email, options).is_err() {
            let message = format!("{field} is not a valid email address");
            return Err(invalid(&field, "format", message));
        }
    }
    Ok(())
}

/// The import as bodies of at most `max` leads, every other field kept in each.
fn split(object: Map<String, Value>, leads: Vec<Value>, max: usize) -> Vec<Batch> {
    leads
        .chunks(max)
        .enumerate()
        .map(|(n, chunk)| {
            let mut body = object.clone();
            body.insert("lead_list".into(), Value::Array(chunk.to_vec()));
            Batch {
                body: Bytes::from(Value::Object(body).to_string()),
                first: n * max,
                count: chunk.len(),
            }
        })
        .collect()
}

fn invalid(field: &str, constraint: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        field: field.to_owned(),
        constraint,
        message: message.into(),
        too_many: None,
    }
}

/// Answers of the batches sent so far, merged: numeric fields summed, `ok` true only if
/// every batch said so, and each batch's own answer kept under `batches`.
#[derive(Debug, Default)]
pub struct Merged {
    totals: Map<String, Value>,
    batches: Vec<Value>,
    leads: usize,
}

impl Merged {
    pub fn add(&mut self, batch: &Batch, status: StatusCode, answer: Value) {
        if let Value::Object(fields) = &answer {
            for (name, value) in fields {
                self.sum(name, value);
            }
        }
        self.leads += batch.count;
        self.batches.push(json!({
            "batch": self.batches.len() + 1,
            "leads": range(batch.first, batch.count),
            "status": status.as_u16(),
            "response": answer,
        }));
    }

    fn sum(&mut self, name: &str, value: &Value) {
        match (self.totals.get_mut(name), value) {
            (Some(Value::Number(total)), Value::Number(n)) => {
                if let (Some(a), Some(b)) = (total.as_i64(), n.as_i64()) {
                    *total = (a + b).into();
                } else if let (Some(a), Some(b)) = (total.as_f64(), n.as_f64())
                    && let Some(sum) = serde_json::Number::from_f64(a + b)
                {
                    *total = sum;
                }
            }
            (Some(Value::Bool(all)), Value::Bool(b)) => *all = *all && *b,
            (None, Value::Number(_) | Value::Bool(_)) => {
                self.totals.insert(name.to_owned(), value.clone());
            }
            _ => {}
        }
    }

    /// Leads in the batches merged so far.
    pub fn leads(&self) -> usize {
        self.leads
    }

    /// The one answer for a fully sent import.
    pub fn into_answer(self) -> Value {
        let mut out = self.totals;
        out.insert("batches".into(), Value::Array(self.batches));
        Value::Object(out)
    }
}

/// `"lead_list[400..800]"`: the leads a batch carried (end exclusive).
pub fn range(first: usize, count: usize) -> String {
    format!("lead_list[{first}..{}]", first + count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(auto_batch: bool) -> LeadsSettings {
        LeadsSettings {
            validate: true,
            max_per_request: 3,
            auto_batch,
            ..LeadsSettings::default()
        }
    }

    fn leads(n: usize) -> Value {
        let list: Vec<Value> = (0..n)
            .map(|i| json!({"email": format!("p{i}@example.com"), "first_name": "P"}))
            .collect();
        json!({"lead_list": list, "settings": {"ignore_global_block_list": true}})
    }

    fn refusal(body: &Value, auto_batch: bool) -> (String, String) {
        let err = plan(&settings(auto_batch), body.to_string().as_bytes()).unwrap_err();
        (err.field, err.constraint.to_owned())
    }

    #[test]
    fn recognises_the_import_path() {
        assert!(is_import(&Method::POST, "/campaigns/42/leads"));
        assert!(is_import(&Method::POST, "/campaigns/42/leads/"));
        assert!(is_import(&Method::POST, "/Campaigns/42/LEADS"));
        assert!(is_import(&Method::POST, "/campaigns/42/%6Ceads"));
        assert!(!is_import(&Method::GET, "/campaigns/42/leads"));
        assert!(!is_import(&Method::POST, "/campaigns/42/leads/7"));
        assert!(!is_import(&Method::POST, "/campaigns//leads"));
        assert!(!is_import(&Method::POST, "/campaigns"));
    }

    #[test]
    fn refuses_bad_imports_in_smartleads_shape() {
        let mut body = leads(3);
        body["lead_list"][2]["email"] = Value::Null;
        assert_eq!(
            refusal(&body, false),
            ("lead_list[2].email".into(), "required".into())
        );
        body["lead_list"][2]["email"] = json!("not-an-address");
        assert_eq!(
            refusal(&body, false),
            ("lead_list[2].email".into(), "format".into())
        );
        body["lead_list"][1] = json!("x@example.com");
        assert_eq!(
            refusal(&body, false),
            ("lead_list[1]".into(), "type".into())
        );
        assert_eq!(
            refusal(&leads(4), false),
            ("lead_list".into(), "max_items".into())
        );
        assert_eq!(refusal(&json!({"leads": []}), false).1, "required");
        assert_eq!(refusal(&json!({"lead_list": {}}), false).1, "type");
        let err = plan(&settings(false), b"not json").unwrap_err();
        assert_eq!((err.field.as_str(), err.constraint), ("body", "json"));
    }

    #[test]
    fn accepts_good_imports_and_ordinary_addresses() {
        for email in [
            "a@example.com",
            "first.last+tag@sub.example.co.uk",
            "x_y@a-b.io",
        ] {
            let body = json!({"lead_list": [{"email": email}]});
            assert!(matches!(
                plan(&settings(false), body.to_string().as_bytes()),
                Ok((Plan::Forward, _))
            ));
        }
        for email in [
            "a@localhost",
            "Name <a@example.com>",
            "a@[127.0.0.1]",
            "a b@x.com",
        ] {
            let body = json!({"lead_list": [{"email": email}]});
            assert_eq!(refusal(&body, false).1, "format", "{email}");
        }
    }

    #[test]
    fn splits_big_imports_keeping_other_fields() {
        let (Plan::Batches(batches), _) =
            plan(&settings(true), leads(7).to_string().as_bytes()).unwrap()
        else {
            panic!("expected batches");
        };
        let counts: Vec<_> = batches.iter().map(|b| (b.first, b.count)).collect();
        assert_eq!(counts, vec![(0, 3), (3, 3), (6, 1)]);
        let second: Value = serde_json::from_slice(&batches[1].body).unwrap();
        assert_eq!(second["lead_list"][0]["email"], "p3@example.com");
        assert_eq!(second["settings"]["ignore_global_block_list"], true);
    }

    #[test]
    fn warns_about_leads_without_personalisation_fields() {
        let body = json!({"lead_list": [
            {"email": "a@example.com", "first_name": "A", "company_name": "X"},
            {"email": "b@example.com", "first_name": " ", "company_name": "X"},
            {"email": "c@example.com", "company_name": null},
        ]});
        let (plan, warnings) = plan(&settings(false), body.to_string().as_bytes()).unwrap();
        assert!(matches!(plan, Plan::Forward));
        let w = warnings.expect("warnings");
        assert_eq!(
            w.missing,
            vec![
                ("first_name".to_owned(), vec![1, 2]),
                ("company_name".to_owned(), vec![2]),
            ]
        );
        assert_eq!(
            w.header(),
            "2 leads without first_name, 1 lead without company_name"
        );
        assert_eq!(
            w.positions(),
            "first_name: lead_list[1], [2]; company_name: lead_list[2]"
        );
        let complete = json!({"lead_list": [{"email": "a@example.com", "first_name": "A", "company_name": "X"}]});
        assert!(
            plan_warnings(&settings(false), &complete).is_none(),
            "no header when every lead has the fields"
        );
        let off = LeadsSettings {
            warn_missing: vec![],
            ..settings(false)
        };
        assert!(plan_warnings(&off, &body).is_none());
        let lots: Vec<Value> = (0..12)
            .map(|i| json!({"email": format!("p{i}@x.io")}))
            .collect();
        let w = Warnings::find(&["first_name".into()], &lots).unwrap();
        assert!(
            w.positions().ends_with("[9], and 2 more"),
            "{}",
            w.positions()
        );
    }

    fn plan_warnings(settings: &LeadsSettings, body: &Value) -> Option<Warnings> {
        plan(settings, body.to_string().as_bytes()).unwrap().1
    }

    #[test]
    fn merges_answers() {
        let mut merged = Merged::default();
        let batch = |first, count| Batch {
            body: Bytes::new(),
            first,
            count,
        };
        merged.add(
            &batch(0, 3),
            StatusCode::OK,
            json!({"ok": true, "upload_count": 3, "message": "a"}),
        );
        merged.add(
            &batch(3, 1),
            StatusCode::OK,
            json!({"ok": true, "upload_count": 1, "duplicate_count": 2}),
        );
        assert_eq!(merged.leads(), 4);
        let out = merged.into_answer();
        assert_eq!(out["ok"], true);
        assert_eq!(out["upload_count"], 4);
        assert_eq!(out["duplicate_count"], 2);
        assert_eq!(out["batches"][1]["leads"], "lead_list[3..4]");
        assert!(out.get("message").is_none());
    }
}
