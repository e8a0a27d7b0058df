use super::*;

pub fn rule(_ctx: &Ctx<'_>) -> Option<Decision> {
    None
}
