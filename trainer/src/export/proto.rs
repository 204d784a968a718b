//! The protobuf wire format, as much of it as an ONNX model needs (varint keys and
//! integers, length-delimited bytes, strings and messages), and the field numbers of the
//! ONNX messages written, named as in `onnx.proto` (ONNX IR 8).

/// A protobuf message being written (wire format: varint keys, varints, length-delimited).
#[derive(Default)]
pub struct Pb(pub Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
    fn key(&mut self, field: u32, wire: u32) {
        self.varint(((field << 3) | wire) as u64);
    }
    pub fn int(&mut self, field: u32, v: i64) -> &mut Pb {
        self.key(field, 0);
        self.varint(v as u64);
        self
    }
    pub fn bytes(&mut self, field: u32, b: &[u8]) -> &mut Pb {
        self.key(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(&mut self, field: u32, s: &str) -> &mut Pb {
        self.bytes(field, s.as_bytes())
    }
    pub fn msg(&mut self, field: u32, m: &Pb) -> &mut Pb {
        self.bytes(field, &m.0)
    }
}

/// `ModelProto`.
pub mod model {
    pub const IR_VERSION: u32 = 1;
    pub const PRODUCER_NAME: u32 = 2;
    pub const PRODUCER_VERSION: u32 = 3;
    pub const GRAPH: u32 = 7;
    pub const OPSET_IMPORT: u32 = 8;
    pub const METADATA_PROPS: u32 = 14;
}

/// `OperatorSetIdProto`.
pub mod operator_set_id {
    pub const VERSION: u32 = 2;
}

/// `StringStringEntryProto` (metadata).
pub mod string_entry {
    pub const KEY: u32 = 1;
    pub const VALUE: u32 = 2;
}

/// `GraphProto`.
pub mod graph {
    pub const NODE: u32 = 1;
    pub const NAME: u32 = 2;
    pub const INITIALIZER: u32 = 5;
    pub const INPUT: u32 = 11;
    pub const OUTPUT: u32 = 12;
}

/// `NodeProto`.
pub mod node {
    pub const INPUT: u32 = 1;
    pub const OUTPUT: u32 = 2;
    pub const NAME: u32 = 3;
    pub const OP_TYPE: u32 = 4;
    pub const ATTRIBUTE: u32 = 5;
}

/// `AttributeProto` and its `AttributeType` values.
pub mod attribute {
    pub const NAME: u32 = 1;
    pub const I: u32 = 3;
    pub const INTS: u32 = 8;
    pub const TYPE: u32 = 20;
    pub const TYPE_INT: i64 = 2;
    pub const TYPE_INTS: i64 = 7;
}

/// `TensorProto` and its `DataType.FLOAT`.
pub mod tensor {
    pub const DIMS: u32 = 1;
    pub const DATA_TYPE: u32 = 2;
    pub const NAME: u32 = 8;
    pub const RAW_DATA: u32 = 9;
    pub const FLOAT: i64 = 1;
}

/// `ValueInfoProto`, `TypeProto`, `TypeProto.Tensor`, `TensorShapeProto` and its
/// `Dimension`.
pub mod value_info {
    pub const NAME: u32 = 1;
    pub const TYPE: u32 = 2;
    /// `TypeProto.tensor_type`.
    pub const TENSOR_TYPE: u32 = 1;
    /// `TypeProto.Tensor.elem_type` and `.shape`.
    pub const ELEM_TYPE: u32 = 1;
    pub const SHAPE: u32 = 2;
    /// `TensorShapeProto.dim`.
    pub const DIM: u32 = 1;
    /// `TensorShapeProto.Dimension.dim_value` and `.dim_param`.
    pub const DIM_VALUE: u32 = 1;
    pub const DIM_PARAM: u32 = 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_keys_follow_the_wire_format() {
        let mut p = Pb::default();
        p.int(1, 300);
        // key (1 << 3 | 0) = 0x08, then 300 = 0xAC 0x02.
        assert_eq!(p.0, [0x08, 0xAC, 0x02]);
        let mut p = Pb::default();
        p.str(2, "ab");
        assert_eq!(p.0, [0x12, 2, b'a', b'b']);
    }
}
