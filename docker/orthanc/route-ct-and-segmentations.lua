-- Orthanc auto-routing to dicomnode with the corrections loop: every CT series and every
-- RTSTRUCT or SEG (a radiologist's contours), once stable, is sent to the modality "node"
-- of DicomModalities. Loaded by "LuaScripts" (docs/deploy.md).
function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality']
  if modality == 'CT' or modality == 'SEG' or modality == 'RTSTRUCT' then
    RestApiPost('/modalities/node/store', '{"Resources":["' .. seriesId .. '"],"Synchronous":false}')
  end
end
