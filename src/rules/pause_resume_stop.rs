use super::*;

pub fn stop(_ctx: &Ctx<'_>) -> Option<Decision> {
    None
}
pub fn pause(_ctx: &Ctx<'_>) -> Option<Decision> {
    None
}
pub fn resume(_ctx: &Ctx<'_>) -> Option<Decision> {
    None
}
