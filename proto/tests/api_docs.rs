//! The API reference, `docs/api.md`, rendered from the comments in
//! `proto/hufu/v1/*.proto` (the descriptor set built by protox keeps them).
//!
//! The test fails when a service, method, message, field, oneof or enum value
//! has no comment, when a method's comment does not say who may call it
//! (`Callers:`) and which errors it returns (`Errors`), or when
//! `docs/api.md` is not what the protos render to. `UPDATE_API_DOCS=1`
//! rewrites the file instead of comparing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    FileDescriptorSet, ServiceDescriptorProto,
};

const PACKAGE: &str = "hufu.v1";

// Paths into FileDescriptorProto / DescriptorProto, as in descriptor.proto.
const FILE_MESSAGE: i32 = 4;
const FILE_ENUM: i32 = 5;
const FILE_SERVICE: i32 = 6;
const FILE_SYNTAX: i32 = 12;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED: i32 = 3;
const MESSAGE_ENUM: i32 = 4;
const MESSAGE_ONEOF: i32 = 8;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

fn package_files() -> Vec<FileDescriptorProto> {
    FileDescriptorSet::decode(hufu_proto::v1::FILE_DESCRIPTOR_SET)
        .expect("the built descriptor set decodes")
        .file
        .into_iter()
        .filter(|f| f.package() == PACKAGE)
        .collect()
}

/// One file's comments by element path, and where each element starts.
struct Comments {
    text: HashMap<Vec<i32>, String>,
    line: HashMap<Vec<i32>, i32>,
}

impl Comments {
    fn of(file: &FileDescriptorProto) -> Comments {
        let mut comments = Comments {
            text: HashMap::new(),
            line: HashMap::new(),
        };
        for loc in file.source_code_info.iter().flat_map(|i| &i.location) {
            if let Some(&line) = loc.span.first() {
                comments.line.entry(loc.path.clone()).or_insert(line);
            }
            let raw = loc.leading_comments().trim_end();
            let raw = if raw.is_empty() {
                loc.trailing_comments().trim_end()
            } else {
                raw
            };
            if !raw.trim().is_empty() {
                // protoc keeps the space after `//`: drop it, keep indents.
                let text: Vec<&str> = raw
                    .lines()
                    .map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end())
                    .collect();
                comments
                    .text
                    .insert(loc.path.clone(), text.join("\n").trim().to_owned());
            }
        }
        comments
    }
}

/// The markdown being written, and the elements found without a comment.
struct Reference {
    out: String,
    missing: Vec<String>,
}

impl Reference {
    /// The comment at `path`, or an empty string after noting `name` missing.
    fn comment(&mut self, comments: &Comments, path: &[i32], name: &str) -> String {
        match comments.text.get(path) {
            Some(text) => text.clone(),
            None => {
                self.missing.push(name.to_owned());
                String::new()
            }
        }
    }

    /// A comment as one table cell: one line, pipes escaped.
    fn cell(&mut self, comments: &Comments, path: &[i32], name: &str) -> String {
        let text = self.comment(comments, path, name);
        let words: Vec<&str> = text.split_whitespace().collect();
        words.join(" ").replace('|', "\\|")
    }

    fn line(&mut self, text: &str) {
        self.out.push_str(text);
        self.out.push('\n');
    }
}

fn anchor(kind: &str, name: &str) -> String {
    format!("{kind}-{name}").to_lowercase().replace('.', "")
}

/// A type reference: a link for this package's types, the name otherwise.
fn type_link(type_name: &str) -> String {
    let name = type_name.trim_start_matches('.');
    match name.strip_prefix("hufu.v1.") {
        Some(local) => format!("[`{local}`](#{})", anchor("type", local)),
        None => format!("`{name}`"),
    }
}

fn field_type(field: &FieldDescriptorProto) -> String {
    let base = match field.r#type() {
        Type::Message | Type::Enum | Type::Group => type_link(field.type_name()),
        scalar => format!(
            "`{}`",
            scalar
                .as_str_name()
                .trim_start_matches("TYPE_")
                .to_lowercase()
        ),
    };
    if field.label() == Label::Repeated {
        format!("repeated {base}")
    } else if field.proto3_optional() {
        format!("optional {base}")
    } else {
        base
    }
}

/// Renders every file of the package; returns the markdown and the names of
/// the elements that have no comment (or a method comment that lacks its
/// callers or errors).
fn render(files: &[FileDescriptorProto]) -> (String, Vec<String>) {
    let mut doc = Reference {
        out: String::new(),
        missing: Vec::new(),
    };
    doc.line("# The `hufu.v1` API");
    doc.line("");
    doc.line("<!-- Generated from proto/hufu/v1/*.proto by proto/tests/api_docs.rs: edit the");
    doc.line("     proto comments, then run `UPDATE_API_DOCS=1 cargo test -p hufu-proto --test api_docs`. -->");
    doc.line("");
    doc.line("Services:");
    doc.line("");
    for file in files {
        for service in &file.service {
            let methods: Vec<String> = service
                .method
                .iter()
                .map(|m| format!("[`{}`](#{})", m.name(), anchor(service.name(), m.name())))
                .collect();
            doc.line(&format!(
                "- [`{}`](#{}): {}",
                service.name(),
                anchor("service", service.name()),
                methods.join(", ")
            ));
        }
    }
    for file in files {
        let comments = Comments::of(file);
        doc.line("");
        doc.line(&format!("## `{}`", file.name()));
        doc.line("");
        let intro = doc.comment(&comments, &[FILE_SYNTAX], file.name());
        doc.line(&intro);
        for (i, service) in file.service.iter().enumerate() {
            render_service(&mut doc, &comments, &[FILE_SERVICE, i as i32], service);
        }
        // Messages and enums in the order the file declares them.
        let mut types: Vec<(i32, Vec<i32>)> = Vec::new();
        for i in 0..file.message_type.len() {
            types.push((0, vec![FILE_MESSAGE, i as i32]));
        }
        for i in 0..file.enum_type.len() {
            types.push((0, vec![FILE_ENUM, i as i32]));
        }
        for (line, path) in &mut types {
            *line = comments.line.get(path).copied().unwrap_or(i32::MAX);
        }
        types.sort();
        for (_, path) in types {
            let index = path[1] as usize;
            if path[0] == FILE_MESSAGE {
                render_message(&mut doc, &comments, &path, "", &file.message_type[index]);
            } else {
                render_enum(&mut doc, &comments, &path, "", &file.enum_type[index]);
            }
        }
    }
    (doc.out, doc.missing)
}

fn render_service(
    doc: &mut Reference,
    comments: &Comments,
    path: &[i32],
    service: &ServiceDescriptorProto,
) {
    let name = service.name();
    doc.line("");
    doc.line(&format!("<a id=\"{}\"></a>", anchor("service", name)));
    doc.line(&format!("### Service `{name}`"));
    doc.line("");
    let text = doc.comment(comments, path, &format!("{PACKAGE}.{name}"));
    doc.line(&text);
    for (j, method) in service.method.iter().enumerate() {
        let full = format!("{PACKAGE}.{name}.{}", method.name());
        let mut method_path = path.to_vec();
        method_path.extend([SERVICE_METHOD, j as i32]);
        doc.line("");
        doc.line(&format!("<a id=\"{}\"></a>", anchor(name, method.name())));
        doc.line(&format!("#### `{name}.{}`", method.name()));
        doc.line("");
        let stream = |yes: bool| if yes { "stream of " } else { "" };
        doc.line(&format!(
            "`/{PACKAGE}.{name}/{}`: request {}{}, response {}{}",
            method.name(),
            stream(method.client_streaming()),
            type_link(method.input_type()),
            stream(method.server_streaming()),
            type_link(method.output_type()),
        ));
        doc.line("");
        let text = doc.comment(comments, &method_path, &full);
        if !text.is_empty() {
            if !text.lines().any(|l| l.starts_with("Callers: ")) {
                doc.missing
                    .push(format!("{full}: no `Callers:` line (who may call it)"));
            }
            if !text.lines().any(|l| l.starts_with("Errors")) {
                doc.missing.push(format!(
                    "{full}: no `Errors` paragraph (the codes it returns)"
                ));
            }
        }
        doc.line(&text);
    }
}

fn render_message(
    doc: &mut Reference,
    comments: &Comments,
    path: &[i32],
    outer: &str,
    message: &DescriptorProto,
) {
    let name = format!("{outer}{}", message.name());
    // Map fields' entry types are generated, not declared: nothing to say.
    if message.options.as_ref().is_some_and(|o| o.map_entry()) {
        return;
    }
    let full = format!("{PACKAGE}.{name}");
    doc.line("");
    doc.line(&format!("<a id=\"{}\"></a>", anchor("type", &name)));
    doc.line(&format!("### Message `{name}`"));
    doc.line("");
    let text = doc.comment(comments, path, &full);
    doc.line(&text);
    let mut oneofs = Vec::new();
    for (k, oneof) in message.oneof_decl.iter().enumerate() {
        let mut oneof_path = path.to_vec();
        oneof_path.extend([MESSAGE_ONEOF, k as i32]);
        let text = doc.cell(comments, &oneof_path, &format!("{full}.{}", oneof.name()));
        oneofs.push((oneof.name().to_owned(), text));
    }
    if !message.field.is_empty() {
        doc.line("");
        doc.line("| Field | Number | Type | Description |");
        doc.line("|---|---|---|---|");
    }
    for (j, field) in message.field.iter().enumerate() {
        let mut field_path = path.to_vec();
        field_path.extend([MESSAGE_FIELD, j as i32]);
        let text = doc.cell(comments, &field_path, &format!("{full}.{}", field.name()));
        let mut kind = field_type(field);
        // A proto3 `optional` is a synthetic oneof: not a choice to explain.
        if let Some(k) = field.oneof_index.filter(|_| !field.proto3_optional()) {
            let _ = write!(kind, ", oneof `{}`", oneofs[k as usize].0);
        }
        doc.line(&format!(
            "| `{}` | {} | {kind} | {text} |",
            field.name(),
            field.number(),
        ));
    }
    if !oneofs.is_empty() {
        doc.line("");
    }
    for (oneof, about) in &oneofs {
        doc.line(&format!("Oneof `{oneof}`: {about}"));
    }
    for (k, nested) in message.nested_type.iter().enumerate() {
        let mut nested_path = path.to_vec();
        nested_path.extend([MESSAGE_NESTED, k as i32]);
        render_message(doc, comments, &nested_path, &format!("{name}."), nested);
    }
    for (k, nested) in message.enum_type.iter().enumerate() {
        let mut nested_path = path.to_vec();
        nested_path.extend([MESSAGE_ENUM, k as i32]);
        render_enum(doc, comments, &nested_path, &format!("{name}."), nested);
    }
}

fn render_enum(
    doc: &mut Reference,
    comments: &Comments,
    path: &[i32],
    outer: &str,
    value_set: &EnumDescriptorProto,
) {
    let name = format!("{outer}{}", value_set.name());
    let full = format!("{PACKAGE}.{name}");
    doc.line("");
    doc.line(&format!("<a id=\"{}\"></a>", anchor("type", &name)));
    doc.line(&format!("### Enum `{name}`"));
    doc.line("");
    let text = doc.comment(comments, path, &full);
    doc.line(&text);
    doc.line("");
    doc.line("| Value | Number | Description |");
    doc.line("|---|---|---|");
    for (j, value) in value_set.value.iter().enumerate() {
        let mut value_path = path.to_vec();
        value_path.extend([ENUM_VALUE, j as i32]);
        let text = doc.cell(comments, &value_path, &format!("{full}.{}", value.name()));
        doc.line(&format!(
            "| `{}` | {} | {text} |",
            value.name(),
            value.number()
        ));
    }
}

fn reference_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md")
}

#[test]
fn docs_api_md_is_the_complete_reference_rendered_from_the_protos() {
    let (markdown, missing) = render(&package_files());
    assert!(
        missing.is_empty(),
        "undocumented in proto/hufu/v1 (write a comment for each):\n  {}",
        missing.join("\n  ")
    );
    let path = reference_path();
    if std::env::var_os("UPDATE_API_DOCS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &markdown).unwrap();
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == markdown,
        "docs/api.md differs from what proto/hufu/v1/*.proto render to: regenerate it with \
         `UPDATE_API_DOCS=1 cargo test -p hufu-proto --test api_docs` and commit it"
    );
}

/// Drops the comment of the element at `path` in the file named `file`.
fn without_comment(files: &mut [FileDescriptorProto], file: &str, path: &[i32]) {
    let file = files.iter_mut().find(|f| f.name() == file).unwrap();
    let info = file.source_code_info.as_mut().unwrap();
    let before = info.location.len();
    info.location.retain(|loc| loc.path != path);
    assert!(info.location.len() < before, "no location at {path:?}");
}

#[test]
fn an_undocumented_field_enum_value_or_method_is_reported() {
    let mut files = package_files();
    // StatusRecord is the file's first message; holder its second field.
    without_comment(
        &mut files,
        "hufu/v1/status.proto",
        &[FILE_MESSAGE, 0, MESSAGE_FIELD, 1],
    );
    // Colour is the file's first enum; GREEN its second value.
    without_comment(
        &mut files,
        "hufu/v1/status.proto",
        &[FILE_ENUM, 0, ENUM_VALUE, 1],
    );
    without_comment(
        &mut files,
        "hufu/v1/admin.proto",
        &[FILE_SERVICE, 0, SERVICE_METHOD, 0],
    );
    let (_, mut missing) = render(&files);
    missing.sort();
    assert_eq!(
        missing,
        [
            "hufu.v1.AdminService.PutStatus",
            "hufu.v1.Colour.COLOUR_GREEN",
            "hufu.v1.StatusRecord.holder",
        ],
    );
}

#[test]
fn a_method_that_does_not_say_who_may_call_it_is_reported() {
    let mut files = package_files();
    let status = files
        .iter_mut()
        .find(|f| f.name() == "hufu/v1/status.proto")
        .unwrap();
    let verify = [FILE_SERVICE, 0, SERVICE_METHOD, 2];
    let loc = status
        .source_code_info
        .as_mut()
        .unwrap()
        .location
        .iter_mut()
        .find(|loc| loc.path == verify)
        .unwrap();
    let text = loc.leading_comments().replace("Callers:", "Who:");
    loc.leading_comments = Some(text);
    let (_, missing) = render(&files);
    assert_eq!(
        missing,
        ["hufu.v1.StatusLookupService.Verify: no `Callers:` line (who may call it)"]
    );
}
