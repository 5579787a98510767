// Proto codegen for the root package. The API (proto/) arrives with the service;
// until then there is nothing to generate.
fn main() {
    println!("cargo:rerun-if-changed=proto");
}
