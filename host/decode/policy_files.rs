//! A policy from its name and the files it reads (`--controller`, `--cost`, `--hazard`), as the
//! command line gives them: `generate`, `bench decode` and `bench batch` build theirs here.

use std::path::Path;

use crate::controller::hazard::HazardModel;
use crate::controller::{self, Controller, CostModel};
use crate::decode::Policy;
use crate::error::{Error, Result};

/// The files a policy may read: the `speckv` predictor (`--controller`), a cost model
/// (`--cost`: `speckv-cost`'s table, `auto`'s prior) and `auto`'s hazard model (`--hazard`). Each
/// defaults to what speckv ships (the cost model to the assumed one).
#[derive(Clone, Copy, Debug, Default)]
pub struct PolicyFiles<'a> {
    pub controller: Option<&'a Path>,
    pub cost: Option<&'a Path>,
    pub hazard: Option<&'a Path>,
}

impl PolicyFiles<'_> {
    /// `--hazard` given where no policy is `auto`: an error, since nothing would read it.
    pub fn check_hazard_used<'n>(&self, mut names: impl Iterator<Item = &'n str>) -> Result<()> {
        match self.hazard {
            Some(p) if !names.any(is_auto) => Err(Error::Other(format!(
                "--hazard {}: only the auto policies read a hazard model, and no policy is auto \
                 or auto-nogate",
                p.display()
            ))),
            _ => Ok(()),
        }
    }
}

/// `auto` and `auto-nogate` (its plain-step gate off): the policies that read a hazard model.
fn is_auto(name: &str) -> bool {
    name == "auto" || name == "auto-nogate"
}

/// The policy named `name` (`plain` → `None`): `fixed:N`, `confidence:P`, `heuristic`, `auto`
/// and `auto-nogate` (the hazard model from `files.hazard`, else the shipped one; its costs' prior
/// from `files.cost`, else the assumed one), and `speckv` / `speckv-cost`, which load the predictor
/// from `files.controller` (and `speckv-cost` the cost model from `files.cost`, else the assumed
/// one).
pub fn policy_from_name(name: &str, files: &PolicyFiles) -> Result<Option<Policy>> {
    if name == "plain" {
        return Ok(None);
    }
    if is_auto(name) {
        return Ok(Some(Policy::Auto(Box::new(crate::decode::Auto {
            gate: name == "auto",
            model: match files.hazard {
                Some(p) => HazardModel::load(p)?,
                None => HazardModel::default_model()?,
            },
            prior: match files.cost {
                Some(c) => CostModel::load(c)?,
                None => CostModel::assumed(),
            },
        }))));
    }
    let (controller, cost) = (files.controller, files.cost);
    let ctl = if name == "speckv" || name == "speckv-cost" {
        let cost = match (name, cost) {
            ("speckv-cost", Some(c)) => Some(CostModel::load(c)?),
            ("speckv-cost", None) => Some(CostModel::assumed()),
            _ => None,
        };
        // Without --controller: the predictor shipped with speckv.
        let mlp = match controller {
            Some(p) => crate::controller::mlp::Mlp::load(p)?,
            None => crate::controller::mlp::Mlp::shipped()?,
        };
        Some(Controller::new(mlp, &controller::PAPER_CANDIDATES, cost)?)
    } else {
        None
    };
    Policy::parse(name, ctl).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names() {
        let none = PolicyFiles::default();
        assert!(policy_from_name("plain", &none).unwrap().is_none());
        assert!(matches!(
            policy_from_name("fixed:3", &none).unwrap(),
            Some(Policy::Fixed(3))
        ));
        // Without --controller, the shipped predictor; a controller that cannot be read is an error.
        assert!(matches!(
            policy_from_name("speckv", &none).unwrap(),
            Some(Policy::SpecKv(_))
        ));
        let missing = std::path::Path::new("/nonexistent/controller.json");
        let files = PolicyFiles {
            controller: Some(missing),
            ..none
        };
        assert!(policy_from_name("speckv", &files).is_err());
        assert!(policy_from_name("fixed:x", &none).is_err());
        assert!(policy_from_name("confidence:1.5", &none).is_err());
        // auto: the shipped hazard model and the assumed prior, or the files given.
        match policy_from_name("auto", &none).unwrap() {
            Some(Policy::Auto(a)) => {
                assert_eq!(a.model.source, HazardModel::default_model().unwrap().source);
                assert!(a.prior.is_assumed());
            }
            other => panic!("{other:?}"),
        }
        let files = PolicyFiles {
            hazard: Some(std::path::Path::new("/nonexistent/hazard.json")),
            ..none
        };
        assert!(policy_from_name("auto", &files).is_err());
        // --hazard is refused where no policy would read it.
        assert!(files
            .check_hazard_used(["plain", "fixed:2"].into_iter())
            .is_err());
        assert!(files
            .check_hazard_used(["plain", "auto"].into_iter())
            .is_ok());
        assert!(none.check_hazard_used(["plain"].into_iter()).is_ok());
    }
}
