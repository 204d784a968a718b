include!("../scripts/build_rpath.rs");

fn main() {
    emit_rpath();
}
