fn main() {
    println!("vdiskfs");
}
